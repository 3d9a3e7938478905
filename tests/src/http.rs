//! HTTP clients that run inside a namespace: chat completions (streaming or not), bursts,
//! raw TCP connects and requests on an open connection.

use std::{
    net::Ipv4Addr,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use futures_util::StreamExt as _;

use crate::{INSTANCE_HEADER, NetNs, VIP, VIP_PORT};

/// What one completion request got back.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The instance that answered (`x-sim-instance`).
    pub instance: String,
    /// Tokens received (SSE chunks before `[DONE]`, or words of the message).
    pub tokens: usize,
    /// Streaming: whether `data: [DONE]` arrived.
    pub done: bool,
    pub time_to_first_token: Duration,
    pub total: Duration,
    /// The reply's text (the stream's deltas, concatenated).
    pub text: String,
}

/// One chat completion to `url` (streaming or not), from the calling thread's namespace.
pub async fn chat(
    client: &reqwest::Client,
    url: &str,
    stream: bool,
    max_tokens: u32,
) -> anyhow::Result<Reply> {
    let messages = serde_json::json!([{"role": "user", "content": "Say hello."}]);
    chat_with(client, url, &messages, stream, max_tokens).await
}

/// One chat completion of `messages` (a JSON array of `{role, content}`) to `url`.
pub async fn chat_with(
    client: &reqwest::Client,
    url: &str,
    messages: &serde_json::Value,
    stream: bool,
    max_tokens: u32,
) -> anyhow::Result<Reply> {
    let start = Instant::now();
    let body = serde_json::json!({
        "model": "sim-llm",
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": stream,
    });
    let resp = client
        .post(url)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = resp.status();
    let instance = resp
        .headers()
        .get(INSTANCE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_owned();
    ensure!(
        status.is_success(),
        "POST {url}: HTTP {status} from {instance}"
    );
    if !stream {
        let v: serde_json::Value = resp.json().await.context("reading JSON body")?;
        let text = v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let total = start.elapsed();
        return Ok(Reply {
            instance,
            tokens: text.split_whitespace().count(),
            done: true,
            time_to_first_token: total,
            total,
            text,
        });
    }
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut text = String::new();
    let (mut tokens, mut done, mut first) = (0, false, None);
    while let Some(chunk) = body.next().await {
        buf.push_str(&String::from_utf8_lossy(
            &chunk.context("reading SSE stream")?,
        ));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let data = event
                .trim()
                .strip_prefix("data:")
                .map(str::trim)
                .unwrap_or("");
            if data == "[DONE]" {
                done = true;
            } else if data.contains("\"delta\"") {
                tokens += 1;
                first.get_or_insert_with(|| start.elapsed());
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(data)
                    && let Some(t) = v["choices"][0]["delta"]["content"].as_str()
                {
                    text.push_str(t);
                }
            }
        }
    }
    let total = start.elapsed();
    Ok(Reply {
        instance,
        tokens,
        done,
        time_to_first_token: first.unwrap_or(total),
        total,
        text,
    })
}

/// `count` chat requests to `url`, `concurrency` at a time, from inside `ns`; each result
/// in request order. Bounded by `count` and by a 60 s timeout per request.
pub fn burst(
    ns: &NetNs,
    url: &str,
    count: usize,
    concurrency: usize,
    stream: bool,
    max_tokens: u32,
) -> anyhow::Result<Vec<anyhow::Result<Reply>>> {
    burst_in_background(ns, url, count, concurrency, stream, max_tokens)?
        .join()
        .map_err(|_| anyhow::anyhow!("burst thread panicked"))?
}

/// Replies of a `burst`.
pub type Replies = anyhow::Result<Vec<anyhow::Result<Reply>>>;

/// `burst` on its own thread: join the handle for the replies.
pub fn burst_in_background(
    ns: &NetNs,
    url: &str,
    count: usize,
    concurrency: usize,
    stream: bool,
    max_tokens: u32,
) -> anyhow::Result<thread::JoinHandle<Replies>> {
    let url = url.to_owned();
    let handle = ns.spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(burst_task(url, count, concurrency, stream, max_tokens))
    })?;
    Ok(thread::spawn(move || {
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("burst thread panicked"))?
            .and_then(|r| r)
    }))
}

async fn burst_task(
    url: String,
    count: usize,
    concurrency: usize,
    stream: bool,
    max_tokens: u32,
) -> Replies {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(0) // one connection per request: each is a new flow
        .build()?;
    let results = futures_util::stream::iter(0..count)
        .map(|_| chat(&client, &url, stream, max_tokens))
        .buffered(concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
    Ok(results)
}

/// How a TCP connect from a namespace ended.
#[derive(Debug)]
pub enum Connect {
    Open(std::net::TcpStream),
    /// Answered with a RST.
    Refused,
    TimedOut,
    Failed(std::io::Error),
}

impl Connect {
    pub fn is_open(&self) -> bool {
        matches!(self, Connect::Open(_))
    }
}

/// `count` TCP connects to `to`, one after the other, from inside `ns` (from `source` if
/// given, else the route's address), each bounded by `timeout`. Open ones stay open.
pub fn connects(
    ns: &NetNs,
    source: Option<Ipv4Addr>,
    to: std::net::SocketAddrV4,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<Connect>> {
    ns.run(move || {
        (0..count)
            .map(|_| connect_one(source, to, timeout))
            .collect()
    })
}

fn connect_one(source: Option<Ipv4Addr>, to: std::net::SocketAddrV4, timeout: Duration) -> Connect {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let socket = match Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)) {
        Ok(s) => s,
        Err(e) => return Connect::Failed(e),
    };
    if let Some(src) = source
        && let Err(e) = socket.bind(&SockAddr::from(std::net::SocketAddrV4::new(src, 0)))
    {
        return Connect::Failed(e);
    }
    match socket.connect_timeout(&SockAddr::from(to), timeout) {
        Ok(()) => Connect::Open(socket.into()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Connect::Refused,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Connect::TimedOut,
        Err(e) => Connect::Failed(e),
    }
}

/// One HTTP/1.1 GET on an open connection, which stays open: the status line.
pub fn http_get_on(stream: &mut std::net::TcpStream, path: &str) -> anyhow::Result<String> {
    Ok(http_head_on(stream, path)?
        .lines()
        .next()
        .unwrap_or("")
        .to_owned())
}

/// One HTTP/1.1 GET on an open connection: the first read of the answer (status line and
/// headers, lower-case names as hyper sends them).
pub fn http_head_on(stream: &mut std::net::TcpStream, path: &str) -> anyhow::Result<String> {
    http_on(
        stream,
        &format!("GET {path} HTTP/1.1\r\nHost: gpulb\r\n\r\n"),
    )
}

/// A one-token completion on an open connection: the instance that answered.
pub fn completion_on(stream: &mut std::net::TcpStream) -> anyhow::Result<String> {
    let body = r#"{"model":"sim-llm","prompt":"hi","max_tokens":1}"#;
    let head = http_on(
        stream,
        &format!(
            "POST /v1/completions HTTP/1.1\r\nHost: gpulb\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )?;
    head.lines()
        .find_map(|l| l.strip_prefix(&format!("{INSTANCE_HEADER}: ")))
        .map(|i| i.trim().to_owned())
        .with_context(|| format!("no {INSTANCE_HEADER} in {head:?}"))
}

fn http_on(stream: &mut std::net::TcpStream, request: &str) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(request.as_bytes())?;
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A GET from inside `ns`: (status, body).
pub fn get(ns: &NetNs, url: &str) -> anyhow::Result<(u16, String)> {
    let url = url.to_owned();
    ns.block_on(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        let resp = client
            .get(&url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = resp.status().as_u16();
        Ok((status, resp.text().await?))
    })
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + crate::patience(timeout);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// `http://<VIP>:<port><path>`
pub fn vip_url(path: &str) -> String {
    format!("http://{VIP}:{VIP_PORT}{path}")
}
