//! [`KvStore`] over etcd's v2 keys API (`/v2/keys/...`, HTTP/JSON), the way flanneld up to
//! v0.17 used it (`subnet/etcdv2/registry.go`): leases are keys with a TTL, created with
//! `prevExist=false`, renewed by setting them again with `prevValue` and the TTL, watched
//! with `wait=true&recursive=true&waitIndex=`; actions `delete`/`expire` are removals and
//! error 401 ("event index cleared") means the watch must list again.
//!
//! No well-kept Rust crate speaks v2, so this is a small client on the HTTP stack the agent
//! already carries through etcd-client (hyper 1, rustls with ring), with typed request
//! parameters and serde response types. One connection per request keeps it simple: the
//! agent makes a handful of requests a day plus one long poll per change.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};

use super::{EtcdApi, EventKind, KeyTtl, Kv, KvEvent, KvStore, KvWatch, WatchBatch};
use crate::control::etcd::{EtcdError, EtcdOptions};

/// A plain request gets this long for an answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A long poll is re-issued (same index) after this long without an event, so a silently
/// dead connection is noticed.
const WATCH_POLL: Duration = Duration::from_secs(300);

/// etcd v2 error codes (etcd's `error/error.go`).
mod code {
    pub const KEY_NOT_FOUND: u32 = 100;
    pub const TEST_FAILED: u32 = 101;
    pub const NODE_EXIST: u32 = 105;
    pub const UNAUTHORIZED: u32 = 110;
    pub const EVENT_INDEX_CLEARED: u32 = 401;
}

/// Characters kept as they are in a query or form value (RFC 3986 unreserved).
const VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');
/// A key's path segments additionally keep '/'.
const PATH: &AsciiSet = &VALUE.remove(b'/');

/// A v2 node (`node`, `prevNode` and the children of a directory).
#[derive(Debug, Deserialize)]
struct Node {
    key: Option<String>,
    value: Option<String>,
    #[serde(default)]
    dir: bool,
    #[serde(default)]
    nodes: Vec<Node>,
    #[serde(rename = "modifiedIndex", default)]
    modified_index: u64,
    /// Seconds left, when the key expires.
    ttl: Option<i64>,
}

/// A successful answer of the keys API.
#[derive(Debug, Deserialize)]
struct Answer {
    action: String,
    node: Node,
}

/// An error answer of the keys API.
#[derive(Debug, Deserialize)]
struct ErrorAnswer {
    #[serde(rename = "errorCode")]
    error_code: u32,
    message: String,
    #[serde(default)]
    cause: String,
    #[serde(default)]
    index: u64,
}

impl ErrorAnswer {
    /// A compare-and-swap lost: the key changed or went away since we read it.
    fn lost_race(&self) -> bool {
        self.error_code == code::TEST_FAILED || self.error_code == code::KEY_NOT_FOUND
    }
}

/// What one request produced.
enum Reply {
    Ok { answer: Answer, etcd_index: u64 },
    Error(ErrorAnswer),
}

/// One endpoint, parsed once.
#[derive(Debug)]
struct Endpoint {
    url: String,
    tls: bool,
    host: String,
    port: u16,
}

impl Endpoint {
    fn parse(url: &str) -> Result<Endpoint, EtcdError> {
        let bad = |why: &str| EtcdError::Connect {
            endpoints: url.to_string(),
            detail: format!("not an etcd endpoint URL: {why}"),
            hint: "; write it as http://HOST:2379 or https://HOST:2379".into(),
        };
        let uri: Uri = url.parse().map_err(|_| bad("cannot parse it"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(bad("the scheme must be http or https")),
        };
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        Ok(Endpoint {
            url: url.trim_end_matches('/').to_string(),
            tls,
            host,
            port,
        })
    }
}

struct Inner {
    endpoints: Vec<Endpoint>,
    tls: Option<tokio_rustls::TlsConnector>,
    /// `Basic ...` when --etcd-username/--etcd-password are given.
    authorization: Option<String>,
    /// The endpoint that answered last: tried first.
    current: AtomicUsize,
}

/// A client of etcd's v2 keys API on several endpoints.
#[derive(Clone)]
pub struct V2Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for V2Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<&str> = self
            .inner
            .endpoints
            .iter()
            .map(|e| e.url.as_str())
            .collect();
        f.debug_struct("V2Client")
            .field("endpoints", &urls)
            .finish()
    }
}

fn read_file(
    path: &std::path::Path,
    what: &'static str,
    flag: &'static str,
) -> Result<Vec<u8>, EtcdError> {
    std::fs::read(path).map_err(|source| EtcdError::TlsFile {
        what,
        flag,
        path: path.to_path_buf(),
        source,
    })
}

fn bad_pem(
    path: &std::path::Path,
    flag: &'static str,
    detail: impl std::fmt::Display,
) -> EtcdError {
    EtcdError::TlsFile {
        what: "PEM",
        flag,
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, detail.to_string()),
    }
}

/// rustls settings from --etcd-cafile/--etcd-certfile/--etcd-keyfile (TLS 1.2 minimum).
fn tls_config(opts: &EtcdOptions) -> Result<rustls::ClientConfig, EtcdError> {
    let mut roots = rustls::RootCertStore::empty();
    match &opts.cafile {
        Some(path) => {
            let pem = read_file(path, "CA", "cafile")?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| bad_pem(path, "cafile", e))?;
                roots.add(cert).map_err(|e| bad_pem(path, "cafile", e))?;
            }
            if roots.is_empty() {
                return Err(bad_pem(path, "cafile", "no certificate in the file"));
            }
        }
        None => {
            return Err(EtcdError::Connect {
                endpoints: opts.endpoints.join(","),
                detail: "https endpoints need the CA that signed etcd's certificate".into(),
                hint: "; pass --etcd-cafile".into(),
            });
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| EtcdError::Connect {
            endpoints: opts.endpoints.join(","),
            detail: format!("TLS setup: {e}"),
            hint: String::new(),
        })?
        .with_root_certificates(roots);
    match (&opts.certfile, &opts.keyfile) {
        (Some(cert_path), Some(key_path)) => {
            let pem = read_file(cert_path, "client certificate", "certfile")?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad_pem(cert_path, "certfile", e))?;
            let pem = read_file(key_path, "client key", "keyfile")?;
            let key =
                PrivateKeyDer::from_pem_slice(&pem).map_err(|e| bad_pem(key_path, "keyfile", e))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| bad_pem(key_path, "keyfile", e))
        }
        (Some(_), None) => Err(EtcdError::HalfIdentity { given: "certfile" }),
        (None, Some(_)) => Err(EtcdError::HalfIdentity { given: "keyfile" }),
        (None, None) => Ok(builder.with_no_client_auth()),
    }
}

/// `a=b&c=d` with each value percent-encoded.
fn encode_pairs(pairs: &[(&str, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", utf8_percent_encode(v, VALUE)))
        .collect::<Vec<_>>()
        .join("&")
}

fn request_error(operation: impl Into<String>, detail: impl std::fmt::Display) -> EtcdError {
    EtcdError::Request {
        operation: operation.into(),
        detail: detail.to_string(),
    }
}

/// Sends one request on a fresh connection and reads the whole answer.
async fn exchange<S>(
    io: S,
    request: Request<Full<Bytes>>,
) -> Result<(StatusCode, u64, Bytes), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP handshake: {}", chain(&e)))?;
    let driver = tokio::spawn(connection);
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("sending the request: {}", chain(&e)))?;
        let status = response.status();
        let etcd_index = response
            .headers()
            .get("x-etcd-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {}", chain(&e)))?
            .to_bytes();
        Ok((status, etcd_index, body))
    }
    .await;
    if result.is_ok() {
        driver.abort();
        return result;
    }
    // The request only says "canceled" when the connection died; the connection's own
    // error says why (e.g. the TLS alert of a server refusing our certificate).
    match tokio::time::timeout(Duration::from_secs(1), driver).await {
        Ok(Ok(Err(conn))) => {
            debug!(error = %chain(&conn), "etcd v2 connection failed");
            result.map_err(|e| format!("{e}: {}", chain(&conn)))
        }
        _ => result,
    }
}

/// An error with its sources ("a: b: c"), skipping repeats.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// What to check for a request that got no answer, from the failure text.
fn failure_hint(detail: &str, tls: bool) -> &'static str {
    let d = detail.to_ascii_lowercase();
    if tls && (d.contains("certificate") || d.contains("alert") || d.contains("tls")) {
        "; the TLS handshake failed: etcd must trust our client certificate (signed by a CA in its \
         --trusted-ca-file; check --etcd-certfile/--etcd-keyfile) and --etcd-cafile must be the CA \
         that signed etcd's certificate, whose names must include the endpoint's host"
    } else {
        "; is etcd running and reachable there? check --etcd-endpoints"
    }
}

impl V2Client {
    /// Builds the client (reads the TLS files now, so a bad path fails at start-up naming
    /// the file) without contacting etcd.
    pub fn new(opts: &EtcdOptions) -> Result<V2Client, EtcdError> {
        if opts.endpoints.is_empty() {
            return Err(EtcdError::NoEndpoints);
        }
        let endpoints = opts
            .endpoints
            .iter()
            .map(|e| Endpoint::parse(e))
            .collect::<Result<Vec<_>, _>>()?;
        let wants_tls = opts.cafile.is_some() || opts.certfile.is_some() || opts.keyfile.is_some();
        if wants_tls && let Some(plain) = endpoints.iter().find(|e| !e.tls) {
            return Err(EtcdError::PlainEndpointWithTls {
                endpoint: plain.url.clone(),
            });
        }
        let tls = if endpoints.iter().any(|e| e.tls) {
            Some(tokio_rustls::TlsConnector::from(Arc::new(tls_config(
                opts,
            )?)))
        } else {
            None
        };
        let authorization = match (&opts.username, &opts.password) {
            (Some(user), Some(password)) => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            )),
            (None, None) => None,
            _ => return Err(EtcdError::HalfCredentials),
        };
        Ok(V2Client {
            inner: Arc::new(Inner {
                endpoints,
                tls,
                authorization,
                current: AtomicUsize::new(0),
            }),
        })
    }

    /// Builds the client and proves it with a read of `<prefix>/config`: the endpoint must
    /// answer, accept our TLS identity and credentials, and serve the v2 API.
    pub async fn connect(opts: &EtcdOptions) -> Result<V2Client, EtcdError> {
        let client = V2Client::new(opts)?;
        client.config_exists(&opts.config_key()).await?;
        Ok(client)
    }

    /// Whether the v2 keyspace holds `key` (used by `--etcd-api=auto`).
    pub async fn config_exists(&self, key: &str) -> Result<bool, EtcdError> {
        match self
            .call(Method::GET, key, &[], &[], REQUEST_TIMEOUT)
            .await?
        {
            Reply::Ok { .. } => Ok(true),
            Reply::Error(e) if e.error_code == code::KEY_NOT_FOUND => Ok(false),
            Reply::Error(e) => Err(self.refused(format!("reading {key}"), &e)),
        }
    }

    fn url_path(key: &str, query: &[(&str, String)]) -> String {
        let key = key.trim_end_matches('/');
        let mut path = format!("/v2/keys{}", utf8_percent_encode(key, PATH));
        if !query.is_empty() {
            path.push('?');
            path.push_str(&encode_pairs(query));
        }
        path
    }

    async fn send_to(
        &self,
        endpoint: &Endpoint,
        method: &Method,
        path_and_query: &str,
        form: &str,
        timeout: Duration,
    ) -> Result<(StatusCode, u64, Bytes), String> {
        let authority = if endpoint.host.contains(':') {
            format!("[{}]:{}", endpoint.host, endpoint.port)
        } else {
            format!("{}:{}", endpoint.host, endpoint.port)
        };
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(path_and_query)
            .header(header::HOST, authority.as_str())
            .header(header::ACCEPT, "application/json");
        if let Some(auth) = &self.inner.authorization {
            builder = builder.header(header::AUTHORIZATION, auth.as_str());
        }
        if !form.is_empty() {
            builder = builder.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        }
        let request = builder
            .body(Full::new(Bytes::from(form.to_owned())))
            .map_err(|e| format!("building the request: {e}"))?;
        let work = async {
            let tcp = tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port))
                .await
                .map_err(|e| format!("connecting: {e}"))?;
            if endpoint.tls {
                let connector = self.inner.tls.as_ref().ok_or("TLS is not set up")?;
                let name = ServerName::try_from(endpoint.host.clone())
                    .map_err(|e| format!("{}: not a TLS server name: {e}", endpoint.host))?;
                let stream = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS handshake: {}", chain(&e)))?;
                exchange(stream, request).await
            } else {
                exchange(tcp, request).await
            }
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| format!("no answer within {timeout:?}"))?
    }

    /// Sends a request to the endpoint that answered last, then to the others; decodes the
    /// answer. `Err` only when no endpoint answered or the answer is not etcd's JSON.
    async fn call(
        &self,
        method: Method,
        key: &str,
        query: &[(&str, String)],
        form: &[(&str, String)],
        timeout: Duration,
    ) -> Result<Reply, EtcdError> {
        let path = Self::url_path(key, query);
        let form = encode_pairs(form);
        let operation = format!("{method} {key} (etcd v2)");
        let n = self.inner.endpoints.len();
        let start = self.inner.current.load(Ordering::Relaxed);
        let mut failures = Vec::new();
        for i in 0..n {
            let index = (start + i) % n;
            let endpoint = &self.inner.endpoints[index];
            match self.send_to(endpoint, &method, &path, &form, timeout).await {
                Ok((status, etcd_index, body)) => {
                    self.inner.current.store(index, Ordering::Relaxed);
                    return decode(&operation, endpoint, status, etcd_index, &body);
                }
                Err(err) => {
                    if n > 1 {
                        warn!(endpoint = %endpoint.url, error = %err, "etcd endpoint not usable; trying the others");
                    }
                    failures.push(format!("{}: {err}", endpoint.url));
                }
            }
        }
        let detail = failures.join("; ");
        let tls = self.inner.tls.is_some();
        Err(EtcdError::Connect {
            endpoints: self
                .inner
                .endpoints
                .iter()
                .map(|e| e.url.as_str())
                .collect::<Vec<_>>()
                .join(","),
            hint: failure_hint(&detail, tls).into(),
            detail,
        })
    }

    fn refused(&self, operation: String, e: &ErrorAnswer) -> EtcdError {
        let hint = match e.error_code {
            code::UNAUTHORIZED if self.inner.authorization.is_some() => {
                "; check --etcd-username and --etcd-password (etcd v2 auth), and that the user's \
                 role may read and write --etcd-prefix"
            }
            code::UNAUTHORIZED => {
                "; etcd has v2 authentication enabled: pass --etcd-username and --etcd-password"
            }
            _ => "",
        };
        request_error(
            operation,
            format!(
                "etcd error {}: {} ({}){hint}",
                e.error_code, e.message, e.cause
            ),
        )
    }
}

fn decode(
    operation: &str,
    endpoint: &Endpoint,
    status: StatusCode,
    etcd_index: u64,
    body: &[u8],
) -> Result<Reply, EtcdError> {
    if status.is_success() {
        let answer: Answer = serde_json::from_slice(body).map_err(|e| {
            request_error(
                operation,
                format!("unexpected answer from {}: {e}", endpoint.url),
            )
        })?;
        return Ok(Reply::Ok { answer, etcd_index });
    }
    if let Ok(error) = serde_json::from_slice::<ErrorAnswer>(body) {
        return Ok(Reply::Error(error));
    }
    let text = String::from_utf8_lossy(body);
    let hint = match status {
        StatusCode::NOT_FOUND => {
            "; this etcd does not serve the v2 API: start it with --enable-v2=true, or use --etcd-api=v3"
        }
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            "; check --etcd-username and --etcd-password (v2 auth)"
        }
        _ => "",
    };
    Err(EtcdError::Connect {
        endpoints: endpoint.url.clone(),
        detail: format!("HTTP {status} for {operation}: {}", text.trim()),
        hint: hint.into(),
    })
}

fn flatten(node: Node, out: &mut Vec<Kv>) {
    if node.dir {
        for child in node.nodes {
            flatten(child, out);
        }
        return;
    }
    out.push(kv_of(node));
}

fn kv_of(node: Node) -> Kv {
    Kv {
        key: node.key.unwrap_or_default(),
        value: node.value.unwrap_or_default().into_bytes(),
        mod_revision: node.modified_index as i64,
        lease: 0,
        ttl: node.ttl,
    }
}

impl V2Client {
    /// Writes `value` with a TTL (whole seconds, at least one), under the conditions in
    /// `query` (prevExist, prevIndex, prevValue).
    async fn put_with_ttl(
        &self,
        key: &str,
        query: &[(&str, String)],
        value: &str,
        ttl: Duration,
    ) -> Result<Reply, EtcdError> {
        let form = [
            ("value", value.to_string()),
            ("ttl", ttl.as_secs().max(1).to_string()),
        ];
        self.call(Method::PUT, key, query, &form, REQUEST_TIMEOUT)
            .await
    }
}

impl KvStore for V2Client {
    type Watch = V2Watch;

    fn api(&self) -> EtcdApi {
        EtcdApi::V2
    }

    async fn reconnect(&self, opts: &EtcdOptions) -> Result<V2Client, EtcdError> {
        // Each request already tries every endpoint.
        let _ = opts;
        Ok(self.clone())
    }

    async fn get(&mut self, key: &str) -> Result<(Option<Kv>, i64), EtcdError> {
        match self
            .call(Method::GET, key, &[], &[], REQUEST_TIMEOUT)
            .await?
        {
            Reply::Ok { answer, etcd_index } if !answer.node.dir => {
                Ok((Some(kv_of(answer.node)), etcd_index as i64))
            }
            Reply::Ok { etcd_index, .. } => Ok((None, etcd_index as i64)),
            Reply::Error(e) if e.error_code == code::KEY_NOT_FOUND => Ok((None, e.index as i64)),
            Reply::Error(e) => Err(self.refused(format!("reading {key}"), &e)),
        }
    }

    async fn list(&mut self, prefix: &str) -> Result<(Vec<Kv>, i64), EtcdError> {
        let query = [("recursive", "true".to_string())];
        match self
            .call(Method::GET, prefix, &query, &[], REQUEST_TIMEOUT)
            .await?
        {
            Reply::Ok { answer, etcd_index } => {
                let mut kvs = Vec::new();
                flatten(answer.node, &mut kvs);
                kvs.sort_by(|a, b| a.key.cmp(&b.key));
                Ok((kvs, etcd_index as i64))
            }
            Reply::Error(e) if e.error_code == code::KEY_NOT_FOUND => {
                Ok((Vec::new(), e.index as i64))
            }
            Reply::Error(e) => Err(self.refused(format!("listing {prefix}"), &e)),
        }
    }

    async fn put(&mut self, key: &str, value: &str) -> Result<(), EtcdError> {
        let form = [("value", value.to_string())];
        match self
            .call(Method::PUT, key, &[], &form, REQUEST_TIMEOUT)
            .await?
        {
            Reply::Ok { .. } => Ok(()),
            Reply::Error(e) => Err(self.refused(format!("writing {key}"), &e)),
        }
    }

    async fn create(
        &mut self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<Option<i64>, EtcdError> {
        let query = [("prevExist", "false".to_string())];
        match self.put_with_ttl(key, &query, value, ttl).await? {
            Reply::Ok { .. } => Ok(Some(0)),
            Reply::Error(e) if e.error_code == code::NODE_EXIST => Ok(None),
            Reply::Error(e) => Err(self.refused(format!("creating {key}"), &e)),
        }
    }

    async fn replace(
        &mut self,
        old: &Kv,
        value: &str,
        ttl: Duration,
    ) -> Result<Option<i64>, EtcdError> {
        let query = [("prevIndex", old.mod_revision.to_string())];
        match self.put_with_ttl(&old.key, &query, value, ttl).await? {
            Reply::Ok { .. } => Ok(Some(0)),
            Reply::Error(e) if e.lost_race() => Ok(None),
            Reply::Error(e) => Err(self.refused(format!("updating {}", old.key), &e)),
        }
    }

    async fn delete_unchanged(&mut self, old: &Kv) -> Result<(), EtcdError> {
        let query = [("prevIndex", old.mod_revision.to_string())];
        match self
            .call(Method::DELETE, &old.key, &query, &[], REQUEST_TIMEOUT)
            .await?
        {
            Reply::Ok { .. } => Ok(()),
            Reply::Error(e) if e.lost_race() => Ok(()),
            Reply::Error(e) => Err(self.refused(format!("deleting {}", old.key), &e)),
        }
    }

    async fn delete(&mut self, key: &str) -> Result<bool, EtcdError> {
        match self
            .call(Method::DELETE, key, &[], &[], REQUEST_TIMEOUT)
            .await?
        {
            Reply::Ok { .. } => Ok(true),
            Reply::Error(e) if e.error_code == code::KEY_NOT_FOUND => Ok(false),
            Reply::Error(e) => Err(self.refused(format!("deleting {key}"), &e)),
        }
    }

    async fn renew(
        &mut self,
        key: &str,
        value: &str,
        _lease: i64,
        ttl: Duration,
    ) -> Result<Option<Duration>, EtcdError> {
        let query = [("prevValue", value.to_string())];
        match self.put_with_ttl(key, &query, value, ttl).await? {
            Reply::Ok { answer, .. } => Ok(Some(
                answer
                    .node
                    .ttl
                    .map_or(ttl, |t| Duration::from_secs(t.max(1) as u64)),
            )),
            Reply::Error(e) if e.lost_race() => Ok(None),
            Reply::Error(e) => Err(self.refused(format!("renewing {key}"), &e)),
        }
    }

    async fn rewrite(
        &mut self,
        key: &str,
        value: &str,
        _lease: i64,
        ttl: Duration,
    ) -> Result<(), EtcdError> {
        match self.put_with_ttl(key, &[], value, ttl).await? {
            Reply::Ok { .. } => Ok(()),
            Reply::Error(e) => Err(self.refused(format!("writing our lease {key} back"), &e)),
        }
    }

    async fn time_to_live(&mut self, kv: &Kv) -> Result<KeyTtl, EtcdError> {
        Ok(match kv.ttl {
            None => KeyTtl::Never,
            Some(t) if t > 0 => KeyTtl::Remaining(Duration::from_secs(t as u64)),
            Some(_) => KeyTtl::Expired,
        })
    }

    async fn watch(&mut self, key: &str, prefix: bool, from: i64) -> Result<V2Watch, EtcdError> {
        Ok(V2Watch {
            client: self.clone(),
            key: key.to_string(),
            recursive: prefix,
            next_index: from.max(1) as u64,
        })
    }
}

/// A v2 watch: one long poll per event, each from the index after the last one seen.
pub struct V2Watch {
    client: V2Client,
    key: String,
    recursive: bool,
    next_index: u64,
}

impl KvWatch for V2Watch {
    async fn next(&mut self) -> Result<WatchBatch, EtcdError> {
        let mut query = vec![
            ("wait", "true".to_string()),
            ("waitIndex", self.next_index.to_string()),
        ];
        if self.recursive {
            query.push(("recursive", "true".to_string()));
        }
        let poll = self
            .client
            .call(Method::GET, &self.key, &query, &[], WATCH_POLL * 2);
        let Ok(reply) = tokio::time::timeout(WATCH_POLL, poll).await else {
            // A poll without events: ask again from the same index.
            return Ok(WatchBatch::Events(Vec::new()));
        };
        let reply = reply?;
        match reply {
            Reply::Ok { answer, .. } => {
                self.next_index = answer.node.modified_index + 1;
                if answer.node.dir {
                    return Ok(WatchBatch::Events(Vec::new()));
                }
                let kind = match answer.action.as_str() {
                    "delete" | "expire" | "compareAndDelete" => EventKind::Delete,
                    _ => EventKind::Put,
                };
                let mut kv = kv_of(answer.node);
                if kind == EventKind::Delete {
                    kv.value.clear();
                }
                Ok(WatchBatch::Events(vec![KvEvent { kind, kv }]))
            }
            Reply::Error(e) if e.error_code == code::EVENT_INDEX_CLEARED => {
                Ok(WatchBatch::Outdated(format!(
                    "the v2 watch on {} is outdated: {} ({})",
                    self.key, e.message, e.cause
                )))
            }
            Reply::Error(e) => Err(self.client.refused(format!("watching {}", self.key), &e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_encode_keys_and_values() {
        assert_eq!(
            V2Client::url_path(
                "/coreos.com/network/subnets/",
                &[("recursive", "true".into())]
            ),
            "/v2/keys/coreos.com/network/subnets?recursive=true"
        );
        assert_eq!(
            encode_pairs(&[("prevValue", r#"{"PublicIP":"10.0.0.1"} &x"#.into())]),
            "prevValue=%7B%22PublicIP%22%3A%2210.0.0.1%22%7D%20%26x"
        );
    }

    #[test]
    fn answers_decode_as_etcd_writes_them() {
        let ep = Endpoint::parse("http://127.0.0.1:2379").expect("endpoint");
        let body = br#"{"action":"get","node":{"key":"/p/subnets","dir":true,"nodes":[{"key":"/p/subnets/10.5.1.0-24","value":"{}","expiration":"2026-12-01T11:00:00Z","ttl":86399,"modifiedIndex":7,"createdIndex":7}],"modifiedIndex":6,"createdIndex":6}}"#;
        let Ok(Reply::Ok { answer, etcd_index }) = decode("list", &ep, StatusCode::OK, 9, body)
        else {
            panic!("a listing")
        };
        assert_eq!(etcd_index, 9);
        let mut kvs = Vec::new();
        flatten(answer.node, &mut kvs);
        assert_eq!(kvs.len(), 1);
        assert_eq!(kvs[0].key, "/p/subnets/10.5.1.0-24");
        assert_eq!((kvs[0].mod_revision, kvs[0].ttl), (7, Some(86399)));
        let body = br#"{"errorCode":401,"message":"The event in requested index is outdated and cleared","cause":"the requested history has been cleared [1008/7]","index":2007}"#;
        let Ok(Reply::Error(e)) = decode("watch", &ep, StatusCode::BAD_REQUEST, 0, body) else {
            panic!("an error answer")
        };
        assert_eq!(e.error_code, code::EVENT_INDEX_CLEARED);
        let err = decode(
            "get",
            &ep,
            StatusCode::NOT_FOUND,
            0,
            b"404 page not found\n",
        )
        .err()
        .expect("not the v2 API");
        assert!(err.to_string().contains("--enable-v2=true"), "{err}");
    }
}
