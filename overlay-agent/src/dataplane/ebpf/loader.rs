//! Loading the embedded eBPF object, pinning its maps, probing the kernel, and removing
//! what a run pinned.

use super::*;

/// Loads the embedded object with its maps pinned (created or reused) under `pin_dir`, and
/// loads every program into the kernel (this runs the verifier). Nothing is attached.
pub fn load(pin_dir: &Path) -> Result<Ebpf, EbpfError> {
    std::fs::create_dir_all(pin_dir).map_err(|source| EbpfError::PinDir {
        path: pin_dir.to_owned(),
        source,
    })?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .load(EBPF_OBJECT)
        .map_err(|source| EbpfError::Load {
            pin_dir: pin_dir.to_owned(),
            source: Box::new(source),
        })?;
    for name in [
        program_names::UPLINK_INGRESS,
        program_names::VXLAN_INGRESS,
        program_names::VXLAN_EGRESS,
        program_names::POD_INGRESS,
        program_names::POD_EGRESS,
        program_names::PROBE_DECAP_L4_UDP,
    ] {
        classifier(&mut ebpf, name)?
            .load()
            .map_err(|source| EbpfError::Program {
                what: "loading (verifier)".into(),
                program: name,
                source: Box::new(source),
            })?;
    }
    Ok(ebpf)
}

/// One of our programs, as a TC classifier.
pub fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, EbpfError> {
    let program = ebpf
        .program_mut(name)
        .ok_or(EbpfError::MissingProgram(name))?;
    program.try_into().map_err(|source| EbpfError::Program {
        what: "not a TC classifier".into(),
        program: name,
        source: Box::new(source),
    })
}

/// A VXLAN frame as a flannel node sends it (outer Ethernet, IPv4, UDP to 8472, VXLAN VNI 1,
/// inner Ethernet, IPv4, TCP): what the probe shrinks, so that only the flag can make it fail.
pub(super) fn probe_frame() -> Vec<u8> {
    let mut frame = Vec::with_capacity(104);
    let inner_ip_len: u16 = 20 + 20;
    let outer_ip_len: u16 = 20 + 8 + 8 + 14 + inner_ip_len;
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00]);
    frame.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0]);
    frame[16..18].copy_from_slice(&outer_ip_len.to_be_bytes());
    frame.extend_from_slice(&[192, 0, 2, 2, 192, 0, 2, 1]);
    frame.extend_from_slice(&[0x9c, 0x40, 0x21, 0x18]);
    frame.extend_from_slice(&(outer_ip_len - 20).to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0x08, 0, 0, 0, 0, 0, 1, 0]);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 1, 1, 0x02, 0, 0, 0, 2, 2, 0x08, 0x00]);
    frame.extend_from_slice(&[0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0]);
    frame.extend_from_slice(&[10, 0, 2, 5, 10, 0, 1, 5]);
    frame.extend_from_slice(&[
        0x30, 0x39, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    frame
}

/// Whether this kernel's `bpf_skb_adjust_room` accepts `BPF_F_ADJ_ROOM_DECAP_L4_UDP`, which
/// lets R3 decapsulate GRO-merged VXLAN too: runs the probe program on a VXLAN frame with
/// BPF_PROG_TEST_RUN (kernels without the flag reject it with -EINVAL before touching the
/// packet, so the answer is the flag's alone).
pub fn probe_decap_l4_udp(ebpf: &mut Ebpf) -> Result<bool, EbpfError> {
    let frame = probe_frame();
    let mut out = vec![0u8; frame.len() + 64];
    let program = classifier(ebpf, program_names::PROBE_DECAP_L4_UDP)?;
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(&frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .map_err(|source| EbpfError::Program {
            what: "running the DECAP_L4_UDP probe (BPF_PROG_TEST_RUN)".into(),
            program: program_names::PROBE_DECAP_L4_UDP,
            source: Box::new(source),
        })?;
    Ok(result.return_value == 1)
}

/// Removes the pinned links and maps under `pin_dir`: detaches the programs and turns the node
/// back into a plain kernel-vxlan (flannel) node. For `--backend=vxlan|host-gw` after an eBPF
/// run, or an explicit uninstall. Returns whether anything was there.
pub fn remove_pinned(pin_dir: &Path) -> Result<bool, EbpfError> {
    match std::fs::remove_dir_all(pin_dir) {
        Ok(()) => {
            info!(pin_dir = %pin_dir.display(), "eBPF datapath removed (links and maps unpinned)");
            Ok(true)
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(EbpfError::Pin {
            what: "removing the pinned eBPF datapath",
            path: pin_dir.to_owned(),
            source,
        }),
    }
}

/// [`remove_pinned`] for `pin_dir` and every older version beside it: what a node that stops
/// running the eBPF datapath (another backend, a fallback) must leave behind: nothing.
pub fn remove_pinned_all_versions(pin_dir: &Path) -> Result<bool, EbpfError> {
    remove_older_versions(pin_dir);
    remove_pinned(pin_dir)
}

/// Removes what older versions of the datapath pinned beside `pin_dir` (`.../v1` next to
/// `.../v2`): their programs would otherwise stay attached in front of ours, working from
/// maps nobody updates.
pub(super) fn remove_older_versions(pin_dir: &Path) {
    let (Some(parent), Some(current)) = (pin_dir.parent(), version_of(pin_dir)) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if version_of(&path).is_some_and(|v| v < current) {
            match remove_pinned(&path) {
                Ok(_) => {
                    info!(old = %path.display(), "removed an older eBPF datapath version's pins (its programs are detached)")
                }
                Err(err) => warn!(error = %err, "could not remove an older eBPF datapath version"),
            }
        }
    }
}

/// `N` of a pin directory named `vN`.
pub(super) fn version_of(path: &Path) -> Option<u32> {
    path.file_name()?.to_str()?.strip_prefix('v')?.parse().ok()
}
