//! Attaching the programs to TCX hooks and keeping their links pinned.

use super::*;

impl<K: Dataplane> EbpfDataplane<K> {
    /// Attaches `program` to `ifname`'s TCX hook and pins the link as `pin_name`. A link
    /// pinned there before (a previous agent, or a re-created interface) is unpinned only
    /// after the new one is attached, so no packet misses the datapath.
    pub(super) fn attach(
        &mut self,
        program: &'static str,
        ifname: &str,
        attach_type: TcAttachType,
        pin_name: &str,
    ) -> Result<(), EbpfError> {
        let pin_path = self.settings.pin_dir.join(pin_name);
        let prog = classifier(&mut self.ebpf, program)?;
        let prog_err = |what: String| {
            move |source| EbpfError::Program {
                what,
                program,
                source: Box::new(source),
            }
        };
        let link_id = prog
            .attach_with_options(
                ifname,
                attach_type,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
            .map_err(prog_err(format!(
                "attaching to TCX {attach_type:?} of {ifname}"
            )))?;
        let link = prog
            .take_link(link_id)
            .map_err(prog_err("taking the link".into()))?;
        let link = FdLink::try_from(link).map_err(|source| EbpfError::Pin {
            what: "the TCX link is not an fd link",
            path: pin_path.clone(),
            source: io::Error::other(source.to_string()),
        })?;
        match PinnedLink::from_pin(&pin_path) {
            Ok(old) => {
                // Dropping the unpinned old link detaches it (we hold no other reference).
                drop(old.unpin().map_err(|source| EbpfError::Pin {
                    what: "unpinning the previous link",
                    path: pin_path.clone(),
                    source,
                })?);
                debug!(path = %pin_path.display(), "previous link replaced");
            }
            Err(_) => debug!(path = %pin_path.display(), "no previous link pinned"),
        }
        // The pin keeps the link attached after we drop our handle (and across restarts).
        drop(link.pin(&pin_path).map_err(|source| EbpfError::Pin {
            what: "pinning the link",
            path: pin_path.clone(),
            source: io::Error::other(source.to_string()),
        })?);
        Ok(())
    }

    /// Unpins (= detaches, if the device still exists) a link.
    pub(super) fn unpin_link(&self, pin_name: &str) -> Result<(), EbpfError> {
        let path = self.settings.pin_dir.join(pin_name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(EbpfError::Pin {
                what: "unpinning a link",
                path,
                source,
            }),
        }
    }
}
