"use strict";
// The login page's script. Plain DOM, no libraries. Everything the API sends back is put
// on the page with textContent only, never as HTML.
(function () {
  const TOKEN_KEY = "smsauth.token"; // sessionStorage: this tab only, gone when it closes
  // The refresh token of a bearer session, beside it. With the site's cookies on, the
  // server keeps it in an HttpOnly cookie instead, which outlives a browser restart.
  const REFRESH_KEY = "smsauth.refresh";
  const LANG_KEY = "smsauth.lang"; // localStorage: the visitor's choice of language

  const TEXT = {
    en: {
      page_title: "Log in - smsauth",
      title: "Log in",
      title_account: "Your account",
      other_lang: "中文",
      tab_sms: "SMS code",
      tab_password: "Password",
      mode_pwlogin: "Log in",
      mode_register: "Register",
      mode_reset: "Reset password",
      phone: "Phone number",
      phone_hint: "e.g. 13812345678",
      captcha: "Characters in the picture",
      captcha_refresh: "Show a new picture",
      captcha_alt: "Picture with characters to type",
      code: "Verification code",
      code_hint: "Code from the SMS",
      send_code: "Send code",
      sending: "Sending…",
      resend_in: "Resend in {n} s",
      password: "Password",
      password_new: "Password (8 or more characters)",
      new_password: "New password",
      nickname_optional: "Nickname (optional)",
      submit_sms: "Log in",
      submit_pwlogin: "Log in",
      submit_register: "Create account",
      submit_reset: "Set new password",
      acct_phone: "Phone",
      acct_nickname: "Nickname",
      acct_id: "User ID",
      acct_created: "Registered",
      acct_last_login: "Last login",
      acct_methods: "Login methods",
      method_sms: "SMS code",
      method_password: "Password",
      method_wechat: "WeChat",
      never: "—",
      logout: "Log out",
      activity_title: "Activity",
      activity_more: "Show older activity",
      activity_used: "{ip} · {when}",
      event_login: "Logged in with {method}",
      event_login_failed: "Wrong password",
      event_logout: "Logged out",
      event_password_change: "Password changed",
      event_wechat_bind: "WeChat linked",
      export: "Download my data",
      export_done: "Your data is downloaded (smsauth-export.json).",
      delete_start: "Delete my account",
      delete_lead: "Deleting your account removes it and everything tied to it: its login methods, sessions and activity. It cannot be undone. To confirm, we send a code to {phone}.",
      delete_send: "Send code",
      delete_confirm_check: "I understand: my account and its data are deleted for good.",
      delete_confirm: "Delete my account for good",
      delete_cancel: "Cancel",
      need_confirm: "Tick the box to confirm that you want your account deleted.",
      account_deleted: "Your account is deleted.",
      sessions_title: "Where you are logged in",
      session_current: "This device",
      session_end: "Log out this device",
      session_used: "{method} · {ip} · last used {when}",
      logout_others: "Log out everywhere else",
      session_ended: "That device is logged out.",
      others_ended: "You are logged out everywhere else.",
      welcome: "Welcome, {name}.",
      welcome_new: "Your account is ready. Welcome, {name}.",
      code_sent: "Code sent. It is valid for {s}.",
      logged_out: "You are logged out.",
      reset_done: "Your password is changed. Log in with the new one.",
      need_phone: "Enter your phone number.",
      need_code: "Enter the code from the SMS.",
      need_password: "Enter a password.",
      need_captcha: "Type the characters shown in the picture.",
      captcha_expired: "The picture expired. Type the characters of the new one.",
      err_network: "Cannot reach the server. Check your connection and try again.",
      err_http: "The server answered with an error ({status}). Try again later.",
      err_invalid_request: "Something in the form is not right. Check what you entered.",
      err_invalid_phone: "That phone number is not valid.",
      err_invalid_code: "The code is wrong or has expired.",
      err_too_many_attempts: "Too many wrong tries. Try again in {s}.",
      err_too_many_attempts_new: "Too many wrong tries. Request a new code.",
      err_rate_limited: "Too many requests. Try again in {s}.",
      err_unauthorized: "Your session has ended. Log in again.",
      err_invalid_credentials: "The phone number or password is wrong.",
      err_phone_taken: "This phone number already has an account. Log in instead.",
      err_weak_password: "The password must be 8 to 128 characters, and not only spaces.",
      err_captcha_required: "Type the characters shown in the picture first.",
      err_captcha_invalid: "The characters did not match the picture, or it expired. Try the new one.",
      err_sms_failed: "The SMS could not be sent. Try again later.",
      err_not_found: "The server does not know this request (not found).",
      err_method_not_allowed: "The server does not allow this request.",
      err_payload_too_large: "What you entered is too long.",
      err_unsupported_media_type: "The server could not read the request.",
      err_internal: "Something went wrong on the server. Try again later.",
      or: "or",
      wechat_login: "Log in with WeChat",
      title_bind: "Bind your phone",
      bind_lead: "Your WeChat account has no phone number yet. Enter yours to finish logging in.",
      submit_bind: "Bind and log in",
      bind_cancel: "Log in another way",
      acct_wechat: "WeChat",
      wechat_bound: "Linked",
      wechat_not_bound: "Not linked",
      wechat_link: "Link WeChat",
      wechat_unlink: "Unlink WeChat",
      wechat_linked: "WeChat is linked to your account. You can log in with it now.",
      wechat_unlinked: "WeChat is no longer linked to your account.",
      err_wechat_denied: "The WeChat login was cancelled.",
      err_wechat_state_invalid: "The WeChat login expired or was started in another browser. Try again.",
      err_wechat_code_invalid: "WeChat refused the login. Scan the QR code again.",
      err_wechat_failed: "WeChat could not be reached. Try again later.",
      err_wechat_taken: "This WeChat account is already linked to another account.",
      err_wechat_already_bound: "This account is already linked to another WeChat account. Unlink that one first.",
      err_wechat_expired: "The WeChat login expired. Log in with WeChat again.",
      err_wechat_other: "The WeChat login did not succeed. Try again.",
      sec: "{n} s",
      min: "{n} min",
      hour: "{n} h",
    },
    zh: {
      page_title: "登录 - smsauth",
      title: "登录",
      title_account: "我的账户",
      other_lang: "English",
      tab_sms: "短信验证码",
      tab_password: "密码",
      mode_pwlogin: "密码登录",
      mode_register: "注册",
      mode_reset: "重置密码",
      phone: "手机号",
      phone_hint: "例如 13812345678",
      captcha: "图片验证码",
      captcha_refresh: "换一张",
      captcha_alt: "图片验证码",
      code: "短信验证码",
      code_hint: "短信中的验证码",
      send_code: "获取验证码",
      sending: "发送中…",
      resend_in: "{n} 秒后重发",
      password: "密码",
      password_new: "密码（至少 8 个字符）",
      new_password: "新密码",
      nickname_optional: "昵称（可选）",
      submit_sms: "登录",
      submit_pwlogin: "登录",
      submit_register: "注册",
      submit_reset: "设置新密码",
      acct_phone: "手机号",
      acct_nickname: "昵称",
      acct_id: "用户 ID",
      acct_created: "注册时间",
      acct_last_login: "上次登录",
      acct_methods: "登录方式",
      method_sms: "短信验证码",
      method_password: "密码",
      method_wechat: "微信",
      never: "—",
      logout: "退出登录",
      activity_title: "账户活动",
      activity_more: "查看更早的记录",
      activity_used: "{ip} · {when}",
      event_login: "通过{method}登录",
      event_login_failed: "密码错误",
      event_logout: "退出登录",
      event_password_change: "修改密码",
      event_wechat_bind: "绑定微信",
      export: "下载我的数据",
      export_done: "您的数据已下载（smsauth-export.json）。",
      delete_start: "注销账户",
      delete_lead: "注销后，账户及其登录方式、登录设备和活动记录将全部删除，且无法恢复。为确认，我们将向 {phone} 发送验证码。",
      delete_send: "获取验证码",
      delete_confirm_check: "我已了解：我的账户及其数据将被永久删除。",
      delete_confirm: "永久注销账户",
      delete_cancel: "取消",
      need_confirm: "请勾选确认您要注销账户。",
      account_deleted: "您的账户已注销。",
      sessions_title: "登录设备",
      session_current: "本设备",
      session_end: "退出此设备",
      session_used: "{method} · {ip} · 最近使用 {when}",
      logout_others: "退出其他所有设备",
      session_ended: "该设备已退出登录。",
      others_ended: "其他设备均已退出登录。",
      welcome: "欢迎，{name}。",
      welcome_new: "账户已创建。欢迎，{name}。",
      code_sent: "验证码已发送，{s}内有效。",
      logged_out: "您已退出登录。",
      reset_done: "密码已修改，请用新密码登录。",
      need_phone: "请输入手机号。",
      need_code: "请输入短信验证码。",
      need_password: "请输入密码。",
      need_captcha: "请输入图片中的字符。",
      captcha_expired: "图片已过期，请输入新图片中的字符。",
      err_network: "无法连接服务器，请检查网络后重试。",
      err_http: "服务器返回错误（{status}），请稍后再试。",
      err_invalid_request: "表单内容有误，请检查后重试。",
      err_invalid_phone: "手机号格式不正确。",
      err_invalid_code: "验证码错误或已过期。",
      err_too_many_attempts: "错误次数过多，请 {s}后再试。",
      err_too_many_attempts_new: "错误次数过多，请重新获取验证码。",
      err_rate_limited: "操作过于频繁，请 {s}后再试。",
      err_unauthorized: "登录已失效，请重新登录。",
      err_invalid_credentials: "手机号或密码错误。",
      err_phone_taken: "该手机号已注册，请直接登录。",
      err_weak_password: "密码需为 8 到 128 个字符，且不能全是空格。",
      err_captcha_required: "请先输入图片中的字符。",
      err_captcha_invalid: "图片验证码错误或已过期，请输入新图片中的字符。",
      err_sms_failed: "短信发送失败，请稍后再试。",
      err_not_found: "服务器不认识这个请求（未找到）。",
      err_method_not_allowed: "服务器不允许这个请求。",
      err_payload_too_large: "输入的内容太长。",
      err_unsupported_media_type: "服务器无法读取这个请求。",
      err_internal: "服务器出错，请稍后再试。",
      or: "或",
      wechat_login: "微信登录",
      title_bind: "绑定手机号",
      bind_lead: "您的微信尚未绑定手机号，请输入手机号完成登录。",
      submit_bind: "绑定并登录",
      bind_cancel: "使用其他方式登录",
      acct_wechat: "微信",
      wechat_bound: "已绑定",
      wechat_not_bound: "未绑定",
      wechat_link: "绑定微信",
      wechat_unlink: "解除绑定",
      wechat_linked: "微信已绑定，现在可以用微信登录。",
      wechat_unlinked: "已解除微信绑定。",
      err_wechat_denied: "已取消微信登录。",
      err_wechat_state_invalid: "微信登录已过期，或不是在此浏览器中发起的，请重试。",
      err_wechat_code_invalid: "微信拒绝了此次登录，请重新扫码。",
      err_wechat_failed: "无法连接微信，请稍后再试。",
      err_wechat_taken: "该微信已绑定其他账户。",
      err_wechat_already_bound: "该账户已绑定其他微信，请先解除绑定。",
      err_wechat_expired: "微信登录已过期，请重新用微信登录。",
      err_wechat_other: "微信登录未成功，请重试。",
      sec: "{n} 秒",
      min: "{n} 分钟",
      hour: "{n} 小时",
    },
  };

  // Which fields each mode uses, what it sends and where.
  const MODES = {
    sms: { tab: "sms", purpose: "login" },
    pwlogin: { tab: "password" },
    register: { tab: "password", purpose: "register" },
    reset: { tab: "password", purpose: "reset_password" },
    // A WeChat user without a phone: phone and a login code, then /auth/wechat/bind.
    bind: { tab: null, purpose: "login" },
  };

  const $ = (id) => document.getElementById(id);
  // The server serves this meta only with WeChat login on; without it the page never
  // shows a WeChat control (the routes would answer 404).
  const WECHAT = (document.querySelector('meta[name="smsauth-wechat"]') || {}).content === "on";
  // The site keeps sessions in cookies: the refresh cookie may outlive the tab.
  const COOKIES = (document.querySelector('meta[name="smsauth-cookie"]') || {}).content === "on";

  const state = {
    lang: "en",
    mode: "sms",
    passwordMode: "pwlogin",
    user: null,
    created: false,
    message: null, // {kind, key, secs, status} or {kind, raw}
    captcha: { shown: false, id: null, expiresAt: 0 },
    sending: false,
    busy: false,
    countdownEnd: 0,
    countdownTimer: null,
    refreshTimer: null,
    bind: null, // {token, nickname, avatar}: the WeChat user who is binding a phone
    activityBefore: null, // the `before` of the next older page of the activity
  };

  function storageGet(store, key) {
    try {
      return window[store].getItem(key);
    } catch (e) {
      return null;
    }
  }
  function storageSet(store, key, value) {
    try {
      if (value === null) window[store].removeItem(key);
      else window[store].setItem(key, value);
    } catch (e) {
      // Storage off (private mode): the page still works for this visit.
    }
  }

  function detectLang() {
    const saved = storageGet("localStorage", LANG_KEY);
    if (saved === "en" || saved === "zh") return saved;
    const langs = navigator.languages && navigator.languages.length
      ? navigator.languages
      : [navigator.language || "en"];
    for (const l of langs) {
      const tag = String(l).toLowerCase();
      if (tag.startsWith("zh")) return "zh";
      if (tag.startsWith("en")) return "en";
    }
    return "en";
  }

  function t(key, vars) {
    let s = TEXT[state.lang][key];
    if (s === undefined) s = TEXT.en[key] || key;
    if (vars) {
      for (const name of Object.keys(vars)) s = s.split("{" + name + "}").join(String(vars[name]));
    }
    return s;
  }

  function duration(secs) {
    const n = Math.max(0, Math.ceil(Number(secs) || 0));
    if (n < 120) return t("sec", { n: n });
    if (n < 7200) return t("min", { n: Math.ceil(n / 60) });
    return t("hour", { n: Math.ceil(n / 3600) });
  }

  // ---- messages ----

  function renderMessage() {
    const el = $("message");
    const m = state.message;
    el.className = "message" + (m ? " " + m.kind : "");
    if (!m) {
      el.textContent = "";
      return;
    }
    el.textContent = m.raw !== undefined
      ? m.raw
      : t(m.key, { s: duration(m.secs), status: m.status });
  }
  function say(kind, key, secs) {
    state.message = { kind: kind, key: key, secs: secs };
    renderMessage();
  }
  function clearMessage() {
    state.message = null;
    renderMessage();
  }
  // An error answer in words: our text for its `error` code, else the server's message.
  // `instead` maps codes to other keys where the generic text would mislead.
  function sayApiError(res, instead) {
    const d = res.data || {};
    let key = "err_" + d.error;
    if (d.error === "too_many_attempts" && d.retry_after == null) key = "err_too_many_attempts_new";
    if (instead && Object.prototype.hasOwnProperty.call(instead, d.error)) key = instead[d.error];
    if (d.error && TEXT.en[key]) {
      state.message = { kind: "error", key: key, secs: d.retry_after };
    } else if (typeof d.message === "string" && d.message) {
      state.message = { kind: "error", raw: d.message };
    } else {
      state.message = { kind: "error", key: "err_http", status: res.status };
    }
    renderMessage();
  }

  // ---- the API ----

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    const token = storageGet("sessionStorage", TOKEN_KEY);
    if (token) headers.Authorization = "Bearer " + token;
    const init = { method: method, headers: headers, credentials: "same-origin", cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(path, init);
    } catch (e) {
      return { ok: false, status: 0, data: { error: "network" } };
    }
    let data = null;
    try {
      const text = await resp.text();
      data = text ? JSON.parse(text) : null;
    } catch (e) {
      data = null;
    }
    return { ok: resp.ok, status: resp.status, data: data };
  }

  // ---- language ----

  function applyLang() {
    document.documentElement.lang = state.lang === "zh" ? "zh-CN" : "en";
    document.title = t("page_title");
    for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
    for (const el of document.querySelectorAll("[data-i18n-placeholder]")) {
      el.placeholder = t(el.dataset.i18nPlaceholder);
    }
    for (const el of document.querySelectorAll("[data-i18n-title]")) el.title = t(el.dataset.i18nTitle);
    $("captcha-image").alt = t("captcha_alt");
    const sw = $("lang-switch");
    sw.textContent = t("other_lang");
    sw.lang = state.lang === "zh" ? "en" : "zh-CN";
    renderMode();
    renderSendButton();
    renderMessage();
    if (state.user) {
      renderAccount();
      loadSessions();
      loadActivity(null);
      if (!$("delete-panel").hidden) {
        $("delete-lead").textContent = t("delete_lead", { phone: String(state.user.phone) });
      }
    }
  }

  function switchLang() {
    state.lang = state.lang === "zh" ? "en" : "zh";
    storageSet("localStorage", LANG_KEY, state.lang);
    applyLang();
  }

  // ---- tabs and modes ----

  function renderMode() {
    const mode = state.mode;
    const tab = MODES[mode].tab;
    for (const b of document.querySelectorAll("[data-tab]")) {
      b.setAttribute("aria-selected", String(b.dataset.tab === tab));
    }
    for (const b of document.querySelectorAll("[data-mode]")) {
      b.setAttribute("aria-selected", String(b.dataset.mode === mode));
    }
    $("password-modes").hidden = tab !== "password";
    $("tabs").hidden = mode === "bind";
    $("wechat-row").hidden = !WECHAT || mode === "bind";
    for (const el of document.querySelectorAll("[data-modes]")) {
      el.hidden = !el.dataset.modes.split(" ").includes(mode);
    }
    if (!state.captcha.shown) $("captcha-row").hidden = true;
    const pw = $("password");
    pw.autocomplete = mode === "pwlogin" ? "current-password" : "new-password";
    $("password-label").textContent = t(
      mode === "register" ? "password_new" : mode === "reset" ? "new_password" : "password",
    );
    $("submit").textContent = t("submit_" + mode);
    $("title").textContent = t(state.user ? "title_account" : mode === "bind" ? "title_bind" : "title");
  }

  function setMode(mode) {
    if (mode === state.mode) return;
    state.mode = mode;
    if (MODES[mode].tab === "password") state.passwordMode = mode;
    clearMessage();
    renderMode();
  }

  // ---- captcha ----

  async function loadCaptcha() {
    const res = await api("POST", "/api/v1/captcha");
    if (!res.ok || !res.data) {
      sayApiError(res);
      return;
    }
    state.captcha.id = res.data.captcha_id;
    state.captcha.expiresAt = Date.now() + (Number(res.data.expires_in) || 0) * 1000;
    const img = $("captcha-image");
    // Only ever a data: URI; the CSP allows no other image source anyway.
    if (typeof res.data.image === "string" && res.data.image.startsWith("data:image/")) {
      img.src = res.data.image;
    }
    $("captcha-answer").value = "";
  }

  function showCaptcha() {
    if (state.captcha.shown) return;
    state.captcha.shown = true;
    renderMode();
  }

  // ---- sending a code, with the countdown of seed 004 ----

  function renderSendButton() {
    const btn = $("send-code");
    const left = Math.ceil((state.countdownEnd - Date.now()) / 1000);
    if (left > 0) {
      btn.disabled = true;
      btn.textContent = t("resend_in", { n: left });
      return;
    }
    if (state.countdownTimer !== null) {
      clearInterval(state.countdownTimer);
      state.countdownTimer = null;
    }
    btn.disabled = state.sending;
    btn.textContent = t(state.sending ? "sending" : "send_code");
  }

  function startCountdown(secs) {
    const n = Number(secs);
    if (!(n > 0)) return;
    // Counted against the clock, so a tab in the background does not fall behind.
    state.countdownEnd = Date.now() + n * 1000;
    if (state.countdownTimer === null) state.countdownTimer = setInterval(renderSendButton, 250);
    renderSendButton();
  }

  function phone() {
    return $("phone").value.trim();
  }

  async function sendCode() {
    if (state.sending) return;
    const number = phone();
    if (!number) {
      say("error", "need_phone");
      $("phone").focus();
      return;
    }
    const body = { phone: number, purpose: MODES[state.mode].purpose || "login" };
    if (state.captcha.shown) {
      if (!state.captcha.id || Date.now() >= state.captcha.expiresAt) {
        await loadCaptcha();
        say("error", "captcha_expired");
        $("captcha-answer").focus();
        return;
      }
      const answer = $("captcha-answer").value.trim();
      if (!answer) {
        say("error", "need_captcha");
        $("captcha-answer").focus();
        return;
      }
      body.captcha_id = state.captcha.id;
      body.captcha_answer = answer;
    }
    state.sending = true;
    renderSendButton();
    const res = await api("POST", "/api/v1/sms/code", body);
    state.sending = false;
    const err = res.data && res.data.error;
    const needCaptcha = err === "captcha_required" || err === "captcha_invalid";
    if (needCaptcha) showCaptcha();
    // A captcha is good for one try, right or wrong.
    if (body.captcha_id || needCaptcha) loadCaptcha();
    if (res.ok) {
      startCountdown(res.data && res.data.resend_after);
      say("info", "code_sent", res.data && res.data.expires_in);
      $("code").focus();
    } else {
      if (err === "rate_limited" && res.data.retry_after <= 300) startCountdown(res.data.retry_after);
      sayApiError(res);
      if (needCaptcha) $("captcha-answer").focus();
    }
    renderSendButton();
  }

  // ---- logging in, registering, resetting ----

  async function submit(ev) {
    ev.preventDefault();
    if (state.busy) return;
    const mode = state.mode;
    const number = phone();
    const code = $("code").value.replace(/\s+/g, "");
    const password = $("password").value;
    const fields = MODES[mode].purpose ? [["code", code, "need_code"]] : [];
    if (mode !== "sms" && mode !== "bind") fields.push(["password", password, "need_password"]);
    if (!number) {
      say("error", "need_phone");
      $("phone").focus();
      return;
    }
    for (const [id, value, key] of fields) {
      if (!value) {
        say("error", key);
        $(id).focus();
        return;
      }
    }
    let res;
    state.busy = true;
    $("submit").disabled = true;
    try {
      if (mode === "sms") {
        res = await api("POST", "/api/v1/auth/sms-login", { phone: number, code: code });
      } else if (mode === "pwlogin") {
        res = await api("POST", "/api/v1/auth/login", { phone: number, password: password });
      } else if (mode === "bind") {
        res = await api("POST", "/api/v1/auth/wechat/bind", {
          bind_token: state.bind.token,
          phone: number,
          code: code,
        });
      } else if (mode === "register") {
        const body = { phone: number, code: code, password: password };
        const nickname = $("nickname").value.trim();
        if (nickname) body.nickname = nickname;
        res = await api("POST", "/api/v1/auth/register", body);
      } else {
        res = await api("POST", "/api/v1/auth/password/reset", {
          phone: number,
          code: code,
          new_password: password,
        });
      }
    } finally {
      state.busy = false;
      $("submit").disabled = false;
    }
    if (!res.ok) {
      const err = res.data && res.data.error;
      // Past the code check the bind token is used up: only a new WeChat login helps.
      if (mode === "bind" && BIND_OVER.includes(err)) endBind();
      sayApiError(res, mode === "bind" ? { invalid_request: "err_wechat_expired" } : undefined);
      if (err === "invalid_code") $("code").select();
      if (err === "weak_password") $("password").select();
      return;
    }
    $("code").value = "";
    $("password").value = "";
    if (mode === "reset") {
      setMode("pwlogin");
      say("info", "reset_done");
      $("password").focus();
      return;
    }
    if (mode === "bind") endBind();
    await loggedIn(res.data);
  }

  // A token answer (a login or a refresh): keep the tokens and refresh before the access
  // token expires.
  function keepTokens(data) {
    const token = data && data.access_token;
    // With cookie sessions the cookies carry the session; the tokens are kept too.
    if (typeof token === "string" && token) storageSet("sessionStorage", TOKEN_KEY, token);
    const refresh = data && data.refresh_token;
    if (typeof refresh === "string" && refresh) storageSet("sessionStorage", REFRESH_KEY, refresh);
    clearTimeout(state.refreshTimer);
    const secs = Number(data && data.expires_in) || 0;
    // At four fifths of its life, and never in a tight loop.
    if (secs > 0) state.refreshTimer = setTimeout(refreshTokens, Math.max(5, secs * 0.8) * 1000);
  }

  function forgetTokens() {
    clearTimeout(state.refreshTimer);
    storageSet("sessionStorage", TOKEN_KEY, null);
    storageSet("sessionStorage", REFRESH_KEY, null);
  }

  // POST /auth/refresh with this tab's refresh token, or with none (the refresh cookie,
  // if the site set one). Resolves to whether the session goes on.
  async function refreshTokens() {
    const refresh = storageGet("sessionStorage", REFRESH_KEY);
    if (!refresh && !COOKIES) return false; // nothing to refresh with
    const res = await api("POST", "/api/v1/auth/refresh", refresh ? { refresh_token: refresh } : undefined);
    if (res.ok && res.data) {
      keepTokens(res.data);
      return true;
    }
    if (res.status === 401 || res.status === 403) {
      const wasIn = state.user !== null;
      forgetTokens();
      if (wasIn) {
        showLogin();
        say("info", "logged_out");
      }
    }
    return false;
  }

  // A token answer (any login): keep the tokens and show the account.
  async function loggedIn(data) {
    keepTokens(data);
    state.created = Boolean(data && data.created);
    await loadAccount(true);
  }

  // ---- the account ----

  function when(s) {
    if (!s) return t("never");
    const d = new Date(s);
    if (isNaN(d.getTime())) return String(s);
    return d.toLocaleString(state.lang === "zh" ? "zh-CN" : "en-GB", {
      dateStyle: "medium",
      timeStyle: "short",
    });
  }

  function renderAccount() {
    const u = state.user;
    $("acct-phone").textContent = String(u.phone);
    $("acct-nickname").textContent = String(u.nickname);
    $("acct-id").textContent = String(u.id);
    $("acct-created").textContent = when(u.created_at);
    $("acct-last-login").textContent = when(u.last_login_at);
    $("acct-methods").textContent = (Array.isArray(u.login_methods) ? u.login_methods : [])
      .map((m) => (TEXT.en["method_" + m] ? t("method_" + m) : String(m)))
      .join(state.lang === "zh" ? "、" : ", ");
    $("welcome").textContent = t(state.created ? "welcome_new" : "welcome", { name: u.nickname });
    $("title").textContent = t("title_account");
    showAvatar($("acct-avatar"), u.avatar_url);
    const bound = Array.isArray(u.login_methods) && u.login_methods.includes("wechat");
    for (const el of document.querySelectorAll("[data-wechat]")) el.hidden = !WECHAT;
    $("acct-wechat").textContent = t(bound ? "wechat_bound" : "wechat_not_bound");
    $("wechat-link").hidden = !WECHAT || bound;
    $("wechat-unlink").hidden = !WECHAT || !bound;
  }

  function showLogin() {
    if (state.user) showDelete(false);
    state.user = null;
    state.created = false;
    $("account-view").hidden = true;
    $("login-view").hidden = false;
    renderMode();
  }

  // GET /me: with the token from this tab's login, or a session cookie if the server
  // sets one. `afterLogin`: a failure here is an error worth showing.
  // Resolves to whether the account is shown.
  async function loadAccount(afterLogin) {
    let res = await api("GET", "/api/v1/me");
    // An expired access token (a tab asleep, a browser restarted with cookies on): one
    // refresh, then ask again.
    if (res.status === 401 && (await refreshTokens())) res = await api("GET", "/api/v1/me");
    if (res.ok && res.data) {
      state.user = res.data;
      clearMessage();
      renderAccount();
      $("login-view").hidden = true;
      $("account-view").hidden = false;
      $("logout").focus();
      loadSessions();
      loadActivity(null);
      return true;
    }
    const hadToken = storageGet("sessionStorage", TOKEN_KEY) !== null;
    if (res.status === 401) forgetTokens();
    showLogin();
    if (afterLogin || hadToken || res.status !== 401) sayApiError(res);
    return false;
  }

  async function logout() {
    const btn = $("logout");
    btn.disabled = true;
    const res = await api("POST", "/api/v1/auth/logout");
    btn.disabled = false;
    // 401: the session had already ended; either way this tab is logged out.
    if (res.ok || res.status === 401) {
      forgetTokens();
      showLogin();
      say("info", "logged_out");
      $("phone").focus();
    } else {
      sayApiError(res);
    }
  }

  // ---- sessions ----

  // GET /me/sessions: every device logged in, this one first, each but this one with a
  // button that logs it out.
  async function loadSessions() {
    const res = await api("GET", "/api/v1/me/sessions");
    const list = $("sessions");
    list.textContent = "";
    if (!res.ok || !Array.isArray(res.data)) return;
    const sessions = res.data.slice().sort((a, b) => Number(Boolean(b.current)) - Number(Boolean(a.current)));
    for (const s of sessions) {
      const li = document.createElement("li");
      li.className = "session";
      li.dataset.session = String(s.id);
      const agent = document.createElement("span");
      agent.className = "agent";
      agent.textContent = String(s.user_agent || "");
      const used = document.createElement("span");
      used.className = "used";
      used.textContent = t("session_used", {
        method: TEXT.en["method_" + s.method] ? t("method_" + s.method) : String(s.method),
        ip: String(s.ip),
        when: when(s.last_used_at),
      });
      li.append(agent, used);
      if (s.current) {
        const here = document.createElement("span");
        here.className = "current";
        here.textContent = t("session_current");
        li.append(here);
      } else {
        const end = document.createElement("button");
        end.type = "button";
        end.className = "link";
        end.textContent = t("session_end");
        end.addEventListener("click", () => endSession(String(s.id), end));
        li.append(end);
      }
      list.append(li);
    }
    $("logout-others").hidden = sessions.length < 2;
  }

  async function endSession(id, btn) {
    btn.disabled = true;
    const res = await api("DELETE", "/api/v1/me/sessions/" + encodeURIComponent(id));
    if (!res.ok && res.status !== 404) {
      btn.disabled = false;
      sayApiError(res);
      return;
    }
    await loadSessions();
    say("info", "session_ended");
  }

  async function logoutOthers() {
    const btn = $("logout-others");
    btn.disabled = true;
    const res = await api("POST", "/api/v1/auth/logout", { scope: "others" });
    btn.disabled = false;
    if (!res.ok) {
      sayApiError(res);
      return;
    }
    await loadSessions();
    say("info", "others_ended");
  }

  // ---- the account holder's own data ----

  // GET /me/activity: the newest 50 entries, then 50 older ones per "show older".
  async function loadActivity(before) {
    const path = "/api/v1/me/activity" + (before ? "?before=" + encodeURIComponent(before) : "");
    const res = await api("GET", path);
    const list = $("activity");
    if (!before) list.textContent = "";
    const more = $("activity-more");
    if (!res.ok || !res.data || !Array.isArray(res.data.activity)) {
      more.hidden = true;
      return;
    }
    for (const e of res.data.activity) {
      const li = document.createElement("li");
      li.className = "session";
      li.dataset.event = String(e.event);
      const what = document.createElement("span");
      what.className = "agent";
      const method = e.method && TEXT.en["method_" + e.method] ? t("method_" + e.method) : String(e.method || "");
      what.textContent = TEXT.en["event_" + e.event] ? t("event_" + e.event, { method: method }) : String(e.event);
      const used = document.createElement("span");
      used.className = "used";
      used.textContent = t("activity_used", { ip: String(e.ip), when: when(e.at) });
      const agent = document.createElement("span");
      agent.className = "used";
      agent.textContent = String(e.user_agent || "");
      li.append(what, used, agent);
      list.append(li);
    }
    state.activityBefore = res.data.next_before || null;
    more.hidden = !state.activityBefore;
  }

  // GET /me/export, saved as the file the server names.
  async function exportData() {
    const btn = $("export");
    btn.disabled = true;
    const res = await api("GET", "/api/v1/me/export");
    btn.disabled = false;
    if (!res.ok || !res.data) {
      sayApiError(res);
      return;
    }
    const blob = new Blob([JSON.stringify(res.data, null, 2) + "\n"], { type: "application/json" });
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = "smsauth-export.json";
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
    say("info", "export_done");
  }

  function showDelete(open) {
    $("delete-panel").hidden = !open;
    $("delete-start").hidden = open;
    $("delete-code").value = "";
    $("delete-confirm").checked = false;
    if (open) {
      $("delete-lead").textContent = t("delete_lead", { phone: String(state.user.phone) });
      $("delete-send").focus();
    }
  }

  // POST /sms/code with purpose delete_account, to the account's own phone.
  async function sendDeleteCode() {
    const btn = $("delete-send");
    btn.disabled = true;
    const res = await api("POST", "/api/v1/sms/code", { phone: String(state.user.phone), purpose: "delete_account" });
    btn.disabled = false;
    if (!res.ok) {
      sayApiError(res);
      return;
    }
    say("info", "code_sent", res.data && res.data.expires_in);
    $("delete-code").focus();
  }

  // POST /me/delete {code}: the account is gone, and this tab logged out.
  async function deleteAccount() {
    const code = $("delete-code").value.trim();
    if (!code) {
      say("error", "need_code");
      $("delete-code").focus();
      return;
    }
    if (!$("delete-confirm").checked) {
      say("error", "need_confirm");
      $("delete-confirm").focus();
      return;
    }
    const btn = $("delete-account");
    btn.disabled = true;
    const res = await api("POST", "/api/v1/me/delete", { code: code });
    btn.disabled = false;
    if (!res.ok) {
      sayApiError(res);
      return;
    }
    showDelete(false);
    forgetTokens();
    showLogin();
    say("info", "account_deleted");
    $("phone").focus();
  }

  // ---- WeChat ----

  // Bind answers after which the bind token is gone (or useless).
  const BIND_OVER = ["invalid_request", "wechat_taken", "wechat_already_bound", "unauthorized"];
  // What the callback may put in the fragment after `wechat_error=`.
  const WECHAT_ERRORS = [
    "wechat_denied",
    "wechat_state_invalid",
    "wechat_code_invalid",
    "wechat_failed",
    "wechat_taken",
    "wechat_already_bound",
    "unauthorized",
  ];

  // Only WeChat's HTTPS image hosts are allowed by the CSP; WeChat has sent http:// URLs
  // for the same hosts. Shown once loaded, so a broken picture is never on the page.
  function showAvatar(img, url) {
    img.hidden = true;
    if (typeof url !== "string" || !/^https?:\/\//.test(url)) {
      img.removeAttribute("src");
      return;
    }
    const src = url.replace(/^http:/, "https:");
    if (img.getAttribute("src") === src && img.complete && img.naturalWidth > 0) img.hidden = false;
    else img.src = src;
  }

  // The outcome the callback left in the fragment, removed from the address at once: the
  // ticket is single use, and a reload or a bookmark must not replay it.
  function takeWechatFragment() {
    if (!location.hash) return null;
    const p = new URLSearchParams(location.hash.slice(1));
    const back = {
      ticket: p.get("wechat_ticket"),
      error: p.get("wechat_error"),
      linked: p.get("wechat_linked") === "1",
    };
    if (back.ticket === null && back.error === null && !p.has("wechat_linked")) return null;
    history.replaceState(history.state, "", location.pathname + location.search);
    return back;
  }

  function sayWechatError(code) {
    say("error", WECHAT_ERRORS.includes(code) ? "err_" + code : "err_wechat_other");
  }

  function startWechat() {
    const next = location.pathname + location.search;
    location.assign("/api/v1/auth/wechat/start?next=" + encodeURIComponent(next));
  }

  // The ticket for a login, or for a bind form when the WeChat user has no account yet.
  async function exchangeTicket(ticket) {
    const res = await api("POST", "/api/v1/auth/wechat/exchange", { ticket: ticket });
    if (!res.ok || !res.data) {
      showLogin();
      sayApiError(res, { invalid_request: "err_wechat_expired" });
      return;
    }
    if (!res.data.phone_required) {
      await loggedIn(res.data);
      return;
    }
    const profile = res.data.profile || {};
    state.bind = {
      token: String(res.data.bind_token),
      nickname: typeof profile.nickname === "string" ? profile.nickname : "",
    };
    showLogin();
    setMode("bind");
    $("bind-nickname").textContent = state.bind.nickname;
    showAvatar($("bind-avatar"), profile.avatar_url);
    $("phone").focus();
  }

  function endBind() {
    state.bind = null;
    $("bind-avatar").hidden = true;
    setMode("sms");
  }

  // POST /me/wechat gives WeChat's URL (and sets the state cookie); the callback comes
  // back here with wechat_linked or wechat_error.
  async function linkWechat() {
    const btn = $("wechat-link");
    btn.disabled = true;
    const res = await api("POST", "/api/v1/me/wechat", { next: location.pathname + location.search });
    const url = res.ok && res.data && res.data.url;
    if (typeof url === "string" && /^https?:\/\//.test(url)) {
      location.assign(url);
      return; // the button stays disabled while the browser leaves
    }
    btn.disabled = false;
    if (res.ok) say("error", "err_wechat_other");
    else sayApiError(res);
  }

  async function unlinkWechat() {
    const btn = $("wechat-unlink");
    btn.disabled = true;
    const res = await api("DELETE", "/api/v1/me/wechat");
    btn.disabled = false;
    if (!res.ok) {
      sayApiError(res);
      return;
    }
    if (await loadAccount(true)) say("info", "wechat_unlinked");
  }

  // On load: the result of a WeChat round trip, if this is one, else the session if any.
  async function start() {
    const back = takeWechatFragment();
    if (back && back.ticket) {
      await exchangeTicket(back.ticket);
      return;
    }
    const shown = await loadAccount(false);
    if (back && back.error !== null) sayWechatError(back.error);
    else if (back && back.linked && shown) say("info", "wechat_linked");
  }

  // ---- wiring ----

  state.lang = detectLang();
  $("lang-switch").addEventListener("click", switchLang);
  for (const b of document.querySelectorAll("[data-tab]")) {
    b.addEventListener("click", () => setMode(b.dataset.tab === "sms" ? "sms" : state.passwordMode));
  }
  for (const b of document.querySelectorAll("[data-mode]")) {
    b.addEventListener("click", () => setMode(b.dataset.mode));
  }
  $("send-code").addEventListener("click", sendCode);
  $("captcha-image-button").addEventListener("click", loadCaptcha);
  $("login-form").addEventListener("submit", submit);
  $("logout").addEventListener("click", logout);
  $("logout-others").addEventListener("click", logoutOthers);
  $("wechat-login").addEventListener("click", startWechat);
  $("bind-cancel").addEventListener("click", () => {
    endBind();
    $("phone").focus();
  });
  $("activity-more").addEventListener("click", () => loadActivity(state.activityBefore));
  $("export").addEventListener("click", exportData);
  $("delete-start").addEventListener("click", () => showDelete(true));
  $("delete-cancel").addEventListener("click", () => showDelete(false));
  $("delete-send").addEventListener("click", sendDeleteCode);
  $("delete-account").addEventListener("click", deleteAccount);
  $("wechat-link").addEventListener("click", linkWechat);
  $("wechat-unlink").addEventListener("click", unlinkWechat);
  for (const img of [$("bind-avatar"), $("acct-avatar")]) {
    img.addEventListener("load", () => {
      img.hidden = false;
    });
    img.addEventListener("error", () => {
      img.hidden = true;
    });
  }
  applyLang();
  start();
})();
