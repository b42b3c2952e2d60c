//! What a test run may not leave on the host: network namespaces, links in the host's own
//! namespace, firewall rules and pinned BPF objects. `cargo xtask test` takes this before
//! and after the tests; anything new afterwards is a leak that fails the run (CI machines
//! are shared with the next job, and so is a developer's).

use std::collections::BTreeSet;

use crate::util;

/// One line per thing found, prefixed by its kind ("netns x", "link y", ...).
pub fn capture() -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    if let Some(list) = util::output_of("ip", &["netns", "list"]) {
        // `ip netns list` prints "name (id: N)" for namespaces with an id.
        for line in list.lines() {
            if let Some(name) = line.split_whitespace().next() {
                found.insert(format!("netns {name}"));
            }
        }
    }
    if let Some(links) = util::output_of("ip", &["-o", "link", "show"]) {
        for line in links.lines() {
            // "7: veth0@if6: <...>": the name, without the peer suffix.
            if let Some(name) = line.split(": ").nth(1) {
                let name = name.split('@').next().unwrap_or(name);
                found.insert(format!("link {name}"));
            }
        }
    }
    for save in ["iptables-save", "iptables-legacy-save"] {
        let Some(program) = util::which(save) else {
            continue;
        };
        let Some(rules) = util::output_of(&program.to_string_lossy(), &[] as &[&str]) else {
            continue;
        };
        // Rules and chains only: counters and the "# Generated" comments change each time.
        for line in rules
            .lines()
            .filter(|l| l.starts_with("-A ") || l.starts_with(':'))
        {
            let line = line.split(" [").next().unwrap_or(line);
            found.insert(format!("{save} {line}"));
        }
    }
    if let Ok(entries) = walk("/sys/fs/bpf") {
        for path in entries {
            found.insert(format!("bpffs {path}"));
        }
    }
    found
}

/// Every pin (non-directory) below `root`. Empty directories hold nothing; tests share
/// parent directories they create on first use.
fn walk(root: &str) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut pending = vec![std::path::PathBuf::from(root)];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                pending.push(path);
            } else {
                out.push(path.display().to_string());
            }
        }
    }
    Ok(out)
}

/// What `after` has that `before` had not.
pub fn leaked(before: &BTreeSet<String>, after: &BTreeSet<String>) -> Vec<String> {
    after.difference(before).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_is_new_counts_as_leaked() {
        let before: BTreeSet<String> = ["netns a", "link lo"].map(String::from).into();
        let after: BTreeSet<String> = ["netns a", "link lo", "iptables-save -A FORWARD -j X"]
            .map(String::from)
            .into();
        assert_eq!(
            leaked(&before, &after),
            vec!["iptables-save -A FORWARD -j X"]
        );
        assert!(leaked(&after, &before).is_empty(), "removals are not leaks");
    }
}
