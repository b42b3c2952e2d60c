//! `/run/flannel/subnet.env`: what docker (via mk-docker-opts.sh) and the flannel CNI plugin
//! read. Written atomically (temp file in the same directory + rename) with mode 0644 and
//! never quoted values (the CNI plugin's parser does not strip quotes).

use std::{
    io::Write as _,
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use ipnetwork::Ipv4Network;

/// The contents of the subnet file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetEnv {
    /// FLANNEL_NETWORK: the whole cluster network.
    pub network: Ipv4Network,
    /// Our subnet (network address form); written as its first host, e.g. 10.5.52.1/24.
    pub subnet: Ipv4Network,
    /// FLANNEL_MTU: the MTU pods should use.
    pub mtu: u32,
    /// FLANNEL_IPMASQ: whether the agent masquerades (`--ip-masq`).
    pub ipmasq: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SubnetFileError {
    #[error(
        "cannot write the subnet file {path}: {source}; check that its directory is writable (--subnet-file)"
    )]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the subnet file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the subnet file {path} has a bad {key} line ({value:?}); it will be rewritten")]
    Malformed {
        path: PathBuf,
        key: &'static str,
        value: String,
    },
}

/// The first host address of a subnet (the bridge's gateway address).
fn first_host(subnet: Ipv4Network) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + 1)
}

impl SubnetEnv {
    /// The file's exact text.
    pub fn render(&self) -> String {
        format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}/{}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.network,
            first_host(self.subnet),
            self.subnet.prefix(),
            self.mtu,
            self.ipmasq
        )
    }

    /// Writes the file atomically with mode 0644, creating its directory if needed.
    pub fn write(&self, path: &Path) -> Result<(), SubnetFileError> {
        let err = |source| SubnetFileError::Write {
            path: path.to_path_buf(),
            source,
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".subnet.env.")
            .tempfile_in(dir)
            .map_err(err)?;
        tmp.write_all(self.render().as_bytes()).map_err(err)?;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(err)?;
        tmp.as_file().sync_all().map_err(err)?;
        tmp.persist(path).map_err(|e| err(e.error))?;
        Ok(())
    }

    /// Reads a subnet file; `Ok(None)` when it does not exist.
    pub fn read(path: &Path) -> Result<Option<SubnetEnv>, SubnetFileError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(SubnetFileError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Self::parse(&text, path).map(Some)
    }

    fn parse(text: &str, path: &Path) -> Result<SubnetEnv, SubnetFileError> {
        let lookup = |key: &'static str| -> Result<String, SubnetFileError> {
            text.lines()
                .filter_map(|l| l.split_once('='))
                .find(|(k, _)| k.trim() == key)
                // Tolerate quotes another tool may have written.
                .map(|(_, v)| v.trim().trim_matches('"').to_string())
                .ok_or_else(|| SubnetFileError::Malformed {
                    path: path.to_path_buf(),
                    key,
                    value: String::new(),
                })
        };
        let malformed = |key: &'static str, value: String| SubnetFileError::Malformed {
            path: path.to_path_buf(),
            key,
            value,
        };
        let network_s = lookup("FLANNEL_NETWORK")?;
        let network: Ipv4Network = network_s
            .parse()
            .map_err(|_| malformed("FLANNEL_NETWORK", network_s.clone()))?;
        let subnet_s = lookup("FLANNEL_SUBNET")?;
        let host: Ipv4Network = subnet_s
            .parse()
            .map_err(|_| malformed("FLANNEL_SUBNET", subnet_s.clone()))?;
        let subnet = Ipv4Network::new(host.network(), host.prefix())
            .map_err(|_| malformed("FLANNEL_SUBNET", subnet_s.clone()))?;
        let mtu_s = lookup("FLANNEL_MTU")?;
        let mtu = mtu_s
            .parse()
            .map_err(|_| malformed("FLANNEL_MTU", mtu_s.clone()))?;
        let masq_s = lookup("FLANNEL_IPMASQ")?;
        let ipmasq = masq_s
            .parse()
            .map_err(|_| malformed("FLANNEL_IPMASQ", masq_s.clone()))?;
        Ok(SubnetEnv {
            network,
            subnet,
            mtu,
            ipmasq,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SubnetEnv {
        SubnetEnv {
            network: "10.5.0.0/16".parse().expect("net"),
            subnet: "10.5.52.0/24".parse().expect("net"),
            mtu: 1450,
            ipmasq: false,
        }
    }

    #[test]
    fn renders_flannels_exact_format() {
        assert_eq!(
            sample().render(),
            "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.52.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
        );
    }

    #[test]
    fn writes_atomically_with_mode_0644_and_reads_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run/flannel/subnet.env");
        sample().write(&path).expect("write");
        let meta = std::fs::metadata(&path).expect("stat");
        assert_eq!(meta.permissions().mode() & 0o777, 0o644);
        assert_eq!(SubnetEnv::read(&path).expect("read"), Some(sample()));
        let changed = SubnetEnv {
            ipmasq: true,
            mtu: 8950,
            ..sample()
        };
        changed.write(&path).expect("rewrite");
        assert_eq!(SubnetEnv::read(&path).expect("read"), Some(changed));
        // No temp files left behind.
        let names: Vec<_> = std::fs::read_dir(path.parent().expect("dir"))
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("subnet.env")]);
    }

    #[test]
    fn missing_file_is_none_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(SubnetEnv::read(&dir.path().join("none")).expect("ok"), None);
        let path = dir.path().join("bad.env");
        std::fs::write(&path, "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=oops\n").expect("write");
        let err = SubnetEnv::read(&path).expect_err("malformed");
        assert!(err.to_string().contains("FLANNEL_SUBNET"), "{err}");
    }
}
