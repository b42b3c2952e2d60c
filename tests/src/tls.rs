//! TLS material for an etcd with client-certificate authentication, made with `openssl`:
//! a CA, a server certificate (also usable by etcdctl as a client) and a client certificate,
//! and on request a client certificate from another CA (which the server must refuse).

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
};

use tempfile::TempDir;

use crate::etcd::EtcdTls;

/// Certificates and keys in a temporary directory (removed on drop).
pub struct TestPki {
    dir: TempDir,
}

impl TestPki {
    /// A CA, `server.pem`/`server.key` valid for `server_ips` (and 127.0.0.1), and
    /// `client.pem`/`client.key`.
    pub fn generate(server_ips: &[Ipv4Addr]) -> TestPki {
        let pki = TestPki {
            dir: tempfile::Builder::new()
                .prefix("overlay-pki-")
                .tempdir()
                .expect("tempdir"),
        };
        pki.ca("ca");
        let mut sans: Vec<String> = server_ips.iter().map(|ip| format!("IP:{ip}")).collect();
        sans.push("IP:127.0.0.1".into());
        sans.push("DNS:localhost".into());
        pki.leaf(
            "server",
            "ca",
            &format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName={}\n",
                sans.join(",")
            ),
        );
        pki.leaf("client", "ca", CLIENT_EXT);
        pki
    }

    /// Adds `rogue-client.pem`/`.key`, signed by another CA (`rogue-ca`): a certificate the
    /// server must refuse.
    pub fn with_rogue_client(self) -> TestPki {
        self.ca("rogue-ca");
        self.leaf("rogue-client", "rogue-ca", CLIENT_EXT);
        self
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// What etcd serves with (etcdctl presents the server certificate, which allows
    /// client authentication too).
    pub fn etcd_tls(&self) -> EtcdTls {
        EtcdTls {
            ca: self.path("ca.pem"),
            cert: self.path("server.pem"),
            key: self.path("server.key"),
        }
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.dir())
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn key(&self, name: &str) {
        self.openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &format!("{name}.key"),
        ]);
    }

    /// A self-signed CA `<name>.pem`/`<name>.key`.
    fn ca(&self, name: &str) {
        self.key(name);
        self.openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN=overlay-test-{name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
    }

    /// `<name>.pem`/`<name>.key` signed by the CA `<ca>`, with the extensions `ext`.
    fn leaf(&self, name: &str, ca: &str, ext: &str) {
        self.key(name);
        self.openssl(&[
            "req",
            "-new",
            "-key",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ]);
        std::fs::write(self.path(&format!("{name}.ext")), ext).expect("write ext");
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ]);
    }
}

const CLIENT_EXT: &str = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n";
