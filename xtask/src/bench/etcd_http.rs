//! A minimal client of etcd's v3 JSON gateway (`POST /v3/kv/put`, `/v3/kv/txn`,
//! `/v3/kv/deleterange`) over one kept-alive HTTP/1.1 connection.
//!
//! Why not etcdctl: one process per write costs ~10 ms, which would swamp the change latency
//! being measured and make 10,000 lease writes slow. Why not an HTTP crate: the socket must be
//! opened inside the fabric namespace (`NetNs::enter`), and a plain `TcpStream` we connect
//! ourselves is the simplest way to do that. etcd-client would need protoc, and xtask must
//! build on a bare machine.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

/// etcd's default `--max-txn-ops`.
const MAX_TXN_OPS: usize = 128;

pub struct EtcdHttp {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl EtcdHttp {
    pub fn new(stream: TcpStream) -> Result<Self> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Self {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        })
    }

    pub fn put(&mut self, key: &str, value: &str) -> Result<()> {
        self.post(
            "/v3/kv/put",
            &json!({"key": B64.encode(key), "value": B64.encode(value)}),
        )
        .with_context(|| format!("etcd put {key}"))?;
        Ok(())
    }

    pub fn delete(&mut self, key: &str) -> Result<()> {
        self.post("/v3/kv/deleterange", &json!({"key": B64.encode(key)}))
            .with_context(|| format!("etcd delete {key}"))?;
        Ok(())
    }

    /// Deletes every key under `prefix`.
    pub fn delete_prefix(&mut self, prefix: &str) -> Result<()> {
        // range_end = prefix with its last byte + 1: etcd's "all keys with this prefix".
        let mut end = prefix.as_bytes().to_vec();
        let last = end.last_mut().context("empty prefix")?;
        *last += 1;
        self.post(
            "/v3/kv/deleterange",
            &json!({"key": B64.encode(prefix), "range_end": B64.encode(&end)}),
        )
        .with_context(|| format!("etcd delete prefix {prefix}"))?;
        Ok(())
    }

    /// Writes many keys, up to etcd's transaction limit per request.
    pub fn put_many(&mut self, kvs: &[(String, String)]) -> Result<()> {
        for chunk in kvs.chunks(MAX_TXN_OPS) {
            let success: Vec<Value> = chunk
                .iter()
                .map(|(k, v)| json!({"requestPut": {"key": B64.encode(k), "value": B64.encode(v)}}))
                .collect();
            self.post("/v3/kv/txn", &json!({"success": success}))
                .with_context(|| format!("etcd txn of {} puts", chunk.len()))?;
        }
        Ok(())
    }

    fn post(&mut self, path: &str, body: &Value) -> Result<Value> {
        let body = body.to_string();
        write!(
            self.writer,
            "POST {path} HTTP/1.1\r\nHost: etcd\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        self.writer.flush()?;
        let mut status = String::new();
        self.reader
            .read_line(&mut status)
            .context("read HTTP status line")?;
        let code: u16 = status
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("bad HTTP status line {status:?}"))?;
        let (mut length, mut chunked) = (None, false);
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
                if name == "content-length" {
                    length = Some(value.parse::<usize>().context("Content-Length")?);
                } else if name == "transfer-encoding" && value.eq_ignore_ascii_case("chunked") {
                    chunked = true;
                }
            }
        }
        let mut data = Vec::new();
        if chunked {
            loop {
                let mut size = String::new();
                self.reader.read_line(&mut size)?;
                let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                    .with_context(|| format!("bad chunk size {size:?}"))?;
                let mut chunk = vec![0; n + 2]; // data + CRLF
                self.reader.read_exact(&mut chunk)?;
                if n == 0 {
                    break;
                }
                data.extend_from_slice(&chunk[..n]);
            }
        } else {
            let n = length.context("etcd response has neither Content-Length nor chunked body")?;
            data.resize(n, 0);
            self.reader.read_exact(&mut data)?;
        }
        let text = String::from_utf8_lossy(&data);
        if code != 200 {
            bail!("etcd answered HTTP {code}: {text}");
        }
        serde_json::from_str(&text).with_context(|| format!("etcd answered non-JSON {text:?}"))
    }
}
