//! A small WebDriver client: headless Chromium driven through chromedriver, JSON over
//! HTTP with reqwest. Just what the page tests need: open a URL, find elements by CSS,
//! type, click, read text, run a script, take screenshots, and wait for conditions by
//! polling with a deadline.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

use super::free_port;

pub const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// W3C WebDriver's key for an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
pub const WAIT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(50);

/// Whether the browser is here; when it is not, a page test prints that it is skipped and
/// passes, unless REQUIRE_BROWSER_TESTS=1 (CI), where a missing browser is a failure. (Not
/// an SMSAUTH_ name: the servers under test inherit the environment and refuse SMSAUTH_
/// variables that are not configuration keys.)
pub fn browser_available(test: &str) -> bool {
    let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("REQUIRE_BROWSER_TESTS").as_deref() == Ok("1") {
        panic!(
            "{test}: REQUIRE_BROWSER_TESTS=1 but {missing:?} missing (apt-get install chromium chromium-driver)"
        );
    }
    eprintln!(
        "{test}: skipped, {missing:?} not installed (apt-get install chromium chromium-driver)"
    );
    false
}

/// The directory cargo builds into (honours CARGO_TARGET_DIR): the test binary's
/// `target/debug/` has the server binary, so its parent is `target/`.
pub fn target_dir() -> PathBuf {
    Path::new(super::BIN)
        .parent()
        .and_then(Path::parent)
        .expect("the binary lives in target/<profile>/")
        .to_path_buf()
}

/// chromedriver with one browser session; both end when this is dropped.
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
    http: reqwest::Client,
}

impl Browser {
    /// Starts chromedriver on a free loopback port and a headless Chromium session with
    /// an English UI (the page picks its language from the browser's).
    pub async fn start(width: u32, height: u32) -> Browser {
        let port = free_port();
        let mut cmd = Command::new(CHROMEDRIVER);
        cmd.arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its own process group, so Drop can end the browsers it started too.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let driver = cmd.spawn().expect("start chromedriver");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let mut browser = Browser {
            driver,
            port,
            session: String::new(),
            http,
        };
        let deadline = Instant::now() + WAIT;
        loop {
            let ready = browser
                .http
                .get(browser.url("/status"))
                .send()
                .await
                .ok()
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not answer on port {port}"
            );
            tokio::time::sleep(POLL).await;
        }
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    "--lang=en-US", format!("--window-size={width},{height}"),
                ],
                "prefs": { "intl.accept_languages": "en-US,en" },
            }
        }}});
        let created = browser.call("POST", "/session", Some(caps)).await;
        browser.session = created["sessionId"]
            .as_str()
            .expect("a session id")
            .to_owned();
        browser
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// One WebDriver command; panics with the driver's message if it fails.
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.try_call(method, path, body)
            .await
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"))
    }

    async fn try_call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(method, self.url(path));
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.map_err(|e| e.to_string())?;
        let ok = resp.status().is_success();
        let value: Value = resp.json().await.map_err(|e| e.to_string())?;
        if ok {
            Ok(value["value"].clone())
        } else {
            Err(format!(
                "{}: {}",
                value["value"]["error"], value["value"]["message"]
            ))
        }
    }

    fn at(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    pub async fn goto(&self, url: &str) {
        self.call("POST", &self.at("/url"), Some(json!({ "url": url })))
            .await;
    }

    pub async fn set_window_size(&self, width: u32, height: u32) {
        self.call(
            "POST",
            &self.at("/window/rect"),
            Some(json!({ "width": width, "height": height })),
        )
        .await;
    }

    async fn try_find(&self, css: &str) -> Option<String> {
        let found = self
            .try_call(
                "POST",
                &self.at("/element"),
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await
            .ok()?;
        found[ELEMENT].as_str().map(str::to_owned)
    }

    async fn find(&self, css: &str) -> String {
        self.try_find(css)
            .await
            .unwrap_or_else(|| panic!("no element {css:?} on the page"))
    }

    /// The element's rendered text ("" while it is hidden).
    pub async fn text(&self, css: &str) -> String {
        let id = self.find(css).await;
        let v = self
            .call("GET", &self.at(&format!("/element/{id}/text")), None)
            .await;
        v.as_str().unwrap_or_default().to_owned()
    }

    /// The element's rendered text, or None if there is no such element (or the page
    /// went away under the request, as it does while a redirect loads the next one).
    async fn try_text(&self, css: &str) -> Option<String> {
        let id = self.try_find(css).await?;
        let v = self
            .try_call("GET", &self.at(&format!("/element/{id}/text")), None)
            .await
            .ok()?;
        Some(v.as_str().unwrap_or_default().to_owned())
    }

    pub async fn displayed(&self, css: &str) -> bool {
        let Some(id) = self.try_find(css).await else {
            return false;
        };
        self.try_call("GET", &self.at(&format!("/element/{id}/displayed")), None)
            .await
            .map(|v| v == Value::Bool(true))
            .unwrap_or(false)
    }

    /// Clears an input and types `text` into it.
    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.call(
            "POST",
            &self.at(&format!("/element/{id}/clear")),
            Some(json!({})),
        )
        .await;
        self.call(
            "POST",
            &self.at(&format!("/element/{id}/value")),
            Some(json!({ "text": text })),
        )
        .await;
    }

    pub async fn click(&self, css: &str) {
        let id = self.find(css).await;
        self.call(
            "POST",
            &self.at(&format!("/element/{id}/click")),
            Some(json!({})),
        )
        .await;
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    pub async fn execute(&self, script: &str, args: Value) -> Value {
        self.call(
            "POST",
            &self.at("/execute/sync"),
            Some(json!({ "script": script, "args": args })),
        )
        .await
    }

    /// Waits until `css` is shown with text that satisfies `pred`; returns that text.
    pub async fn wait_text(&self, css: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        let mut last = String::new();
        loop {
            // Between the two calls a navigation can replace the page: polled again.
            if self.displayed(css).await
                && let Some(text) = self.try_text(css).await
            {
                last = text;
                if pred(&last) {
                    return last;
                }
            }
            if Instant::now() >= deadline {
                let path = self.screenshot_to("timeout").await;
                panic!(
                    "waited {WAIT:?} for {css:?} to show {what}; last text {last:?}; page: {}",
                    path.display()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until `css` is displayed (`true`) or hidden or gone (`false`).
    pub async fn wait_displayed(&self, css: &str, shown: bool) {
        let deadline = Instant::now() + WAIT;
        while self.displayed(css).await != shown {
            if Instant::now() >= deadline {
                let path = self.screenshot_to("timeout").await;
                panic!(
                    "waited {WAIT:?} for {css:?} to be {}; page: {}",
                    if shown { "shown" } else { "hidden" },
                    path.display()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// A PNG of the viewport, written to `path` (directories made as needed).
    pub async fn screenshot(&self, path: &Path) {
        let b64 = self.call("GET", &self.at("/screenshot"), None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().expect("base64 PNG"))
            .expect("valid base64");
        assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }

    async fn screenshot_to(&self, name: &str) -> PathBuf {
        let path = target_dir().join("screenshots").join(format!("{name}.png"));
        self.screenshot(&path).await;
        path
    }

    /// Ends the session (the browser quits); Drop also does this if a test panics.
    pub async fn quit(mut self) {
        let session = std::mem::take(&mut self.session);
        let _ = self
            .try_call("DELETE", &format!("/session/{session}"), None)
            .await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            // No runtime to lean on here: a plain blocking HTTP/1.1 request.
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let _ = write!(
                    s,
                    "DELETE /session/{} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
                    self.session, self.port
                );
                let _ = s.read_to_end(&mut Vec::new());
            }
        }
        // chromedriver and anything left of the browser: the process group it leads.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.driver.id())])
            .status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
