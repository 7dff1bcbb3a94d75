//! The development sender: writes the code to the log at INFO, since showing it is its
//! whole job. The phone is masked like everywhere else in the log.

use super::{Outgoing, Sender, SmsError};
use crate::store::BoxFuture;

pub struct LogSender;

impl Sender for LogSender {
    fn send<'a>(&'a self, msg: &'a Outgoing<'a>) -> BoxFuture<'a, Result<(), SmsError>> {
        tracing::info!(
            phone = %msg.phone.masked(),
            purpose = msg.purpose.as_str(),
            code = msg.code,
            expires_in = msg.expires_in,
            "verification code (log sender)"
        );
        Box::pin(std::future::ready(Ok(())))
    }
}
