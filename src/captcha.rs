//! Image captchas in front of SMS sending. A challenge is a PNG of distorted characters
//! from an alphabet without look-alikes; only its answer is kept (by the store's
//! [`CaptchaAnswers`]: in memory for the embedded engine, shared in a cluster), and the
//! first check of an id removes it, right or wrong.

use std::sync::{Arc, OnceLock};

use base64::Engine;
use captcha::Captcha;
use rand::RngExt;
use subtle::ConstantTimeEq;

use crate::clock::now;
use crate::config::CaptchaConfig;
use crate::store::{CaptchaAnswers, StoreError};

/// No 0/O, no 1/I/L: what a person reads is what they type. Upper case only; answers
/// are compared case-insensitively.
const ALPHABET: &[char] = &[
    '2', '3', '4', '5', '6', '7', '8', '9', 'A', 'B', 'C', 'D', 'E', 'F', 'G', 'H', 'J', 'K', 'M',
    'N', 'P', 'Q', 'R', 'S', 'T', 'U', 'V', 'W', 'X', 'Y', 'Z',
];

pub const WIDTH: u32 = 200;
pub const HEIGHT: u32 = 70;

pub struct Challenge {
    pub id: String,
    /// `data:image/png;base64,...`
    pub image: String,
    pub expires_in: u64,
}

pub struct Captchas {
    answers: Arc<dyn CaptchaAnswers>,
    cfg: CaptchaConfig,
}

impl Captchas {
    pub fn new(cfg: &CaptchaConfig, answers: Arc<dyn CaptchaAnswers>) -> Self {
        glyphs(); // made once at start, not on the first request
        Captchas {
            answers,
            cfg: cfg.clone(),
        }
    }

    pub fn required(&self) -> bool {
        self.cfg.required
    }

    /// Makes and remembers a new challenge (None if rendering failed). CPU-bound but
    /// short (0.11 ms: docs/security.md, "The captcha"), so it runs inline.
    pub async fn create(&self) -> Result<Option<Challenge>, StoreError> {
        let Some((answer, png)) = render(self.cfg.length) else {
            return Ok(None);
        };
        let mut id = [0u8; 16];
        rand::rng().fill(&mut id);
        let id = hex::encode(id);
        // TRACE only: below DEBUG, so never in an operator's log; tests read it to solve
        // captchas the honest way, through the log, with no endpoint that tells answers.
        tracing::trace!(captcha_id = %id, answer = %answer, "captcha made");
        let expires_at = now() + self.cfg.ttl_secs as i64;
        self.answers.put_captcha(&id, &answer, expires_at).await?;
        let image = format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(png)
        );
        Ok(Some(Challenge {
            id,
            image,
            expires_in: self.cfg.ttl_secs,
        }))
    }

    /// True if `answer` solves captcha `id`. The id is used up either way.
    pub async fn check(&self, id: &str, answer: &str) -> Result<bool, StoreError> {
        let Some((expected, expires_at)) = self.answers.take_captcha(id).await? else {
            return Ok(false);
        };
        if now() >= expires_at {
            return Ok(false);
        }
        let given = answer.trim().to_ascii_uppercase();
        Ok(
            given.len() == expected.len()
                && bool::from(given.as_bytes().ct_eq(expected.as_bytes())),
        )
    }

    /// Forgets answers past their deadline (the clean-up).
    pub async fn prune(&self) -> Result<(), StoreError> {
        self.answers.prune_captchas(now()).await
    }
}

/// One character's ink, cropped to its bounding box: 0 = paper, 255 = full ink.
struct Glyph {
    width: usize,
    height: usize,
    ink: Vec<u8>,
}

/// The glyphs of [`ALPHABET`], taken once from the captcha crate's own (MIT) bitmap font
/// through its public API: render the character alone, decode, crop. Composing each
/// challenge from these is far cheaper than the crate's full-canvas pipeline.
fn glyphs() -> &'static [Glyph] {
    static GLYPHS: OnceLock<Vec<Glyph>> = OnceLock::new();
    GLYPHS.get_or_init(|| ALPHABET.iter().map(|&c| extract_glyph(c)).collect())
}

fn extract_glyph(c: char) -> Glyph {
    let mut one = Captcha::new();
    one.set_chars(&[c]).add_chars(1).view(80, 80);
    let png_bytes = one.as_png().expect("the font renders its own characters");
    let mut decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder.read_info().expect("a PNG");
    let mut rgb = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut rgb).expect("a frame");
    let (w, h) = (frame.width as usize, frame.height as usize);
    let channels = frame.buffer_size() / (w * h);
    // lodepng picks the smallest colour type: grey, grey+alpha, RGB or RGBA.
    let ink = |x: usize, y: usize| {
        let px = &rgb[(y * w + x) * channels..][..channels];
        let lum = if channels >= 3 {
            (px[0] as u32 + px[1] as u32 + px[2] as u32) / 3
        } else {
            px[0] as u32
        };
        255 - lum as u8
    };
    let inked = |x: usize, y: usize| ink(x, y) > 60;
    let xs: Vec<usize> = (0..w).filter(|&x| (0..h).any(|y| inked(x, y))).collect();
    let ys: Vec<usize> = (0..h).filter(|&y| (0..w).any(|x| inked(x, y))).collect();
    // Every character of the font has ink; an empty glyph would be a broken font.
    let (Some(&x0), Some(&x1), Some(&y0), Some(&y1)) =
        (xs.first(), xs.last(), ys.first(), ys.last())
    else {
        panic!("the captcha font has no ink for {c:?}");
    };
    let (width, height) = (x1 - x0 + 1, y1 - y0 + 1);
    let ink = (y0..=y1)
        .flat_map(|y| (x0..=x1).map(move |x| (x, y)))
        .map(|(x, y)| ink(x, y))
        .collect();
    Glyph { width, height, ink }
}

/// The answer and the PNG of a fresh challenge: the characters sheared and shifted one
/// by one, the whole line waved, then speckled and crossed by lines.
pub fn render(length: u32) -> Option<(String, Vec<u8>)> {
    let (w, h) = (WIDTH as usize, HEIGHT as usize);
    let glyphs = glyphs();
    let mut rng = rand::rng();
    let mut paper = vec![255u8; w * h];
    let mut answer = String::with_capacity(length as usize);
    let (amplitude, period, phase) = (
        rng.random_range(2.0..5.0f32),
        rng.random_range(18.0..30.0f32),
        rng.random_range(0.0..6.3f32),
    );
    let mut x = rng.random_range(4..10) as f32;
    for _ in 0..length {
        let i = rng.random_range(0..ALPHABET.len());
        answer.push(ALPHABET[i]);
        let g = &glyphs[i];
        let scale = 42.0 / g.height.max(1) as f32 * rng.random_range(0.85..1.0f32);
        let (gw, gh) = (
            (g.width as f32 * scale) as usize,
            (g.height as f32 * scale) as usize,
        );
        let shear = rng.random_range(-0.35..0.35f32);
        // Inside the wave's reach of either edge, so no character is cut off.
        let margin = amplitude.ceil() as usize + 1;
        let room = h.saturating_sub(gh + 2 * margin).max(1);
        let top = (margin + rng.random_range(0..room)) as f32;
        for gy in 0..gh {
            let src_y = ((gy as f32 / scale) as usize).min(g.height - 1);
            let slant = shear * (gy as f32 - gh as f32 / 2.0);
            for gx in 0..gw {
                let ink = g.ink[src_y * g.width + ((gx as f32 / scale) as usize).min(g.width - 1)];
                if ink == 0 {
                    continue;
                }
                let px = x + gx as f32 + slant;
                let py = top + gy as f32 + amplitude * (px / period + phase).sin();
                let (px, py) = (px as isize, py as isize);
                if (0..w as isize).contains(&px) && (0..h as isize).contains(&py) {
                    let cell = &mut paper[py as usize * w + px as usize];
                    *cell = (*cell).min(255 - ink);
                }
            }
        }
        x += gw as f32 * rng.random_range(0.88..1.0f32);
    }
    for _ in 0..(w * h / 12) {
        let cell = &mut paper[rng.random_range(0..w * h)];
        *cell = cell.saturating_sub(rng.random_range(60..160));
    }
    for _ in 0..2 {
        let (x0, y0) = (0.0f32, rng.random_range(0.0..h as f32));
        let (x1, y1) = (w as f32, rng.random_range(0.0..h as f32));
        for step in 0..w {
            let t = step as f32 / w as f32;
            let (px, py) = ((x0 + t * (x1 - x0)) as usize, (y0 + t * (y1 - y0)) as usize);
            if px < w && py < h {
                paper[py * w + px] = 40;
            }
        }
    }
    let mut png_bytes = Vec::with_capacity(8 * 1024);
    let mut encoder = png::Encoder::new(&mut png_bytes, WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Fast);
    encoder.write_header().ok()?.write_image_data(&paper).ok()?;
    Some((answer, png_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{BoxFuture, ready};
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// Answers in a plain map the test can look into.
    #[derive(Default)]
    struct Answers(Mutex<HashMap<String, (String, i64)>>);

    impl Answers {
        fn answer(&self, id: &str) -> Option<String> {
            self.0.lock().unwrap().get(id).map(|(a, _)| a.clone())
        }
    }

    impl CaptchaAnswers for Answers {
        fn put_captcha<'a>(
            &'a self,
            id: &'a str,
            answer: &'a str,
            expires_at: i64,
        ) -> BoxFuture<'a, Result<(), StoreError>> {
            let entry = (answer.to_owned(), expires_at);
            self.0.lock().unwrap().insert(id.to_owned(), entry);
            ready(Ok(()))
        }
        fn take_captcha<'a>(
            &'a self,
            id: &'a str,
        ) -> BoxFuture<'a, Result<Option<(String, i64)>, StoreError>> {
            ready(Ok(self.0.lock().unwrap().remove(id)))
        }
        fn prune_captchas(&self, _: i64) -> BoxFuture<'_, Result<(), StoreError>> {
            ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn single_use_and_case_insensitive() {
        let answers = Arc::new(Answers::default());
        let captchas = Captchas::new(&CaptchaConfig::default(), answers.clone());
        let challenge = captchas.create().await.unwrap().unwrap();
        assert!(
            challenge
                .image
                .starts_with("data:image/png;base64,iVBORw0KGgo")
        );
        let answer = answers.answer(&challenge.id).unwrap();
        assert_eq!(answer.len(), 5);
        assert!(answer.chars().all(|c| ALPHABET.contains(&c)));
        assert!(
            captchas
                .check(&challenge.id, &answer.to_ascii_lowercase())
                .await
                .unwrap()
        );
        assert!(
            !captchas.check(&challenge.id, &answer).await.unwrap(),
            "used up"
        );

        let wrong = captchas.create().await.unwrap().unwrap();
        assert!(!captchas.check(&wrong.id, "nope").await.unwrap());
        assert!(
            answers.answer(&wrong.id).is_none(),
            "a wrong answer uses the captcha up too"
        );
    }
}
