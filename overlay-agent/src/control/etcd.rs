//! The etcd connection: several endpoints, TLS (CA, client certificate and key files) and
//! v3 username/password auth, as flanneld's `--etcd-*` flags describe it.

use std::{fmt::Write as _, path::PathBuf, time::Duration};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

/// How to reach etcd (from the `--etcd-*` flags).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    /// Key prefix without a trailing slash (e.g. `/coreos.com/network`).
    pub prefix: String,
    pub keyfile: Option<PathBuf>,
    pub certfile: Option<PathBuf>,
    pub cafile: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl EtcdOptions {
    /// `<prefix>/config`.
    pub fn config_key(&self) -> String {
        format!("{}/config", self.prefix)
    }

    /// `<prefix>/subnets/` (with the trailing slash, for prefix reads and watches).
    pub fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    fn uses_tls(&self) -> bool {
        self.cafile.is_some() || self.certfile.is_some() || self.keyfile.is_some()
    }
}

/// Why etcd could not be used. Each says what to check.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("no etcd endpoint given: pass --etcd-endpoints=https://HOST:2379[,...]")]
    NoEndpoints,
    #[error("cannot read the etcd {what} file {path}: {source}; check --etcd-{flag}")]
    TlsFile {
        what: &'static str,
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--etcd-certfile and --etcd-keyfile must be given together (got only --etcd-{given})")]
    HalfIdentity { given: &'static str },
    #[error("--etcd-username and --etcd-password must be given together")]
    HalfCredentials,
    #[error("etcd endpoint {endpoint} uses http:// but TLS files were given: use https://")]
    PlainEndpointWithTls { endpoint: String },
    #[error("cannot connect to etcd at {endpoints}: {detail}{hint}")]
    Connect {
        endpoints: String,
        detail: String,
        /// What to check, when the failure says (starts with "; ").
        hint: String,
    },
    #[error("etcd {operation} failed: {detail}")]
    Request { operation: String, detail: String },
}

impl EtcdError {
    /// Wraps an etcd client error with what was being done.
    pub fn request(operation: impl Into<String>, err: etcd_client::Error) -> EtcdError {
        EtcdError::Request {
            operation: operation.into(),
            detail: describe(&err),
        }
    }
}

/// The full chain of an etcd client error: tonic hides the useful part (a TLS or DNS
/// failure) in nested sources.
pub fn describe(err: &etcd_client::Error) -> String {
    let mut text = err.to_string();
    let mut source: Option<&dyn std::error::Error> = match err {
        etcd_client::Error::TransportError(e) => std::error::Error::source(e),
        etcd_client::Error::GRpcStatus(s) => std::error::Error::source(s),
        _ => None,
    };
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            let _ = write!(text, ": {part}");
        }
        source = s.source();
    }
    text
}

fn read_file(path: &PathBuf, what: &'static str, flag: &'static str) -> Result<Vec<u8>, EtcdError> {
    std::fs::read(path).map_err(|source| EtcdError::TlsFile {
        what,
        flag,
        path: path.clone(),
        source,
    })
}

/// Builds the client options (reads the TLS files now, so a bad path fails at start-up
/// naming the file).
pub fn connect_options(opts: &EtcdOptions) -> Result<ConnectOptions, EtcdError> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(true);
    match (&opts.username, &opts.password) {
        (Some(user), Some(password)) => options = options.with_user(user, password),
        (None, None) => {}
        _ => return Err(EtcdError::HalfCredentials),
    }
    if opts.uses_tls() {
        if let Some(endpoint) = opts.endpoints.iter().find(|e| e.starts_with("http://")) {
            return Err(EtcdError::PlainEndpointWithTls {
                endpoint: endpoint.clone(),
            });
        }
        let mut tls = TlsOptions::new();
        if let Some(ca) = &opts.cafile {
            tls = tls.ca_certificate(Certificate::from_pem(read_file(ca, "CA", "cafile")?));
        }
        match (&opts.certfile, &opts.keyfile) {
            (Some(cert), Some(key)) => {
                let cert = read_file(cert, "client certificate", "certfile")?;
                let key = read_file(key, "client key", "keyfile")?;
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            (Some(_), None) => return Err(EtcdError::HalfIdentity { given: "certfile" }),
            (None, Some(_)) => return Err(EtcdError::HalfIdentity { given: "keyfile" }),
            (None, None) => {}
        }
        options = options.with_tls(tls);
    }
    Ok(options)
}

/// What to check for a failed connection, from the (lower-level) error text.
fn connect_hint(opts: &EtcdOptions, detail: &str) -> &'static str {
    let d = detail.to_ascii_lowercase();
    if d.contains("authentication failed") {
        "; check --etcd-username and --etcd-password"
    } else if d.contains("user name is empty") {
        "; etcd has authentication enabled: pass --etcd-username and --etcd-password"
    } else if d.contains("permission denied") {
        "; the etcd user may not read this prefix: grant it a role with read/write on --etcd-prefix"
    } else if opts.uses_tls()
        && (d.contains("certificate")
            || d.contains("tls")
            || d.contains("handshake")
            || d.contains("transport error"))
    {
        "; the TLS handshake failed: etcd must trust our client certificate (signed by a CA in its \
         --trusted-ca-file; check --etcd-certfile/--etcd-keyfile) and --etcd-cafile must be the CA \
         that signed etcd's certificate, whose names must include the endpoint's host"
    } else if d.contains("connection refused") || d.contains("dns error") || d.contains("timed out")
    {
        "; is etcd running and reachable there? check --etcd-endpoints"
    } else {
        ""
    }
}

/// Connects to one endpoint and proves it with a cheap read under our prefix (needs a
/// working transport, TLS and, with auth, a user allowed to read the prefix).
async fn connect_one(
    endpoint: &str,
    options: ConnectOptions,
    opts: &EtcdOptions,
) -> Result<Client, EtcdError> {
    let connect_err = |err: etcd_client::Error| {
        let detail = describe(&err);
        EtcdError::Connect {
            endpoints: endpoint.to_string(),
            hint: connect_hint(opts, &detail).to_string(),
            detail,
        }
    };
    tracing::debug!(endpoint, tls = opts.uses_tls(), "probing the etcd endpoint");
    let probe = async {
        let mut client = Client::connect([endpoint], Some(options))
            .await
            .map_err(connect_err)?;
        client
            .get(
                opts.config_key(),
                Some(etcd_client::GetOptions::new().with_count_only()),
            )
            .await
            .map_err(connect_err)?;
        Ok(client)
    };
    tokio::time::timeout(Duration::from_secs(10), probe)
        .await
        .map_err(|_| EtcdError::Connect {
            endpoints: endpoint.to_string(),
            detail: "no answer within 10 s".into(),
            hint: "; is etcd running and reachable there? check --etcd-endpoints".into(),
        })?
}

/// Connects to the endpoints that answer, so a wrong certificate, password or address fails
/// here with a clear message instead of later in a watch.
///
/// Each endpoint is probed first and only the live ones go into the client: tonic's
/// balancer would otherwise send some requests to an endpoint that refuses connections
/// (flanneld's default list even names :4001, which rarely listens).
pub async fn connect(opts: &EtcdOptions) -> Result<Client, EtcdError> {
    if opts.endpoints.is_empty() {
        return Err(EtcdError::NoEndpoints);
    }
    let options = connect_options(opts)?;
    let probes = opts
        .endpoints
        .iter()
        .map(|endpoint| connect_one(endpoint, options.clone(), opts));
    let results: Vec<Result<Client, EtcdError>> = futures_util::future::join_all(probes).await;
    let mut live = Vec::new();
    let mut first_error = None;
    for (endpoint, result) in opts.endpoints.iter().zip(results) {
        match result {
            Ok(client) => live.push((endpoint.clone(), client)),
            Err(err) => {
                if opts.endpoints.len() > 1 {
                    tracing::warn!(endpoint = %endpoint, error = %err, "etcd endpoint not usable; using the others");
                }
                first_error.get_or_insert(err);
            }
        }
    }
    match live.len() {
        0 => Err(first_error.expect("at least one endpoint was tried")),
        1 => Ok(live.pop().expect("one").1),
        _ => {
            let endpoints: Vec<String> = live.into_iter().map(|(e, _)| e).collect();
            Client::connect(&endpoints, Some(options))
                .await
                .map_err(|err| {
                    let detail = describe(&err);
                    EtcdError::Connect {
                        endpoints: endpoints.join(","),
                        hint: connect_hint(opts, &detail).to_string(),
                        detail,
                    }
                })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_tls_file_names_the_file() {
        let opts = EtcdOptions {
            endpoints: vec!["https://127.0.0.1:2379".into()],
            cafile: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        let err = connect_options(&opts).expect_err("missing file");
        let msg = err.to_string();
        assert!(
            msg.contains("/nonexistent/ca.pem") && msg.contains("--etcd-cafile"),
            "{msg}"
        );
    }

    #[test]
    fn half_identity_and_credentials_are_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("c.pem");
        std::fs::write(&cert, "x").expect("write");
        let opts = EtcdOptions {
            endpoints: vec!["https://127.0.0.1:2379".into()],
            certfile: Some(cert),
            ..Default::default()
        };
        assert!(matches!(
            connect_options(&opts),
            Err(EtcdError::HalfIdentity { given: "certfile" })
        ));
        let opts = EtcdOptions {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            username: Some("u".into()),
            ..Default::default()
        };
        assert!(matches!(
            connect_options(&opts),
            Err(EtcdError::HalfCredentials)
        ));
    }

    #[test]
    fn tls_with_http_endpoint_is_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "x").expect("write");
        let opts = EtcdOptions {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            cafile: Some(ca),
            ..Default::default()
        };
        assert!(matches!(
            connect_options(&opts),
            Err(EtcdError::PlainEndpointWithTls { .. })
        ));
    }
}
