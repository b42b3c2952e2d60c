//! Printing an error with its causes, once each.
//!
//! Most of this crate's errors already put their cause in their message
//! (`#[error("...: {source}")]`) so that a log field `error = %err` says everything; some
//! (docker_opts.rs) leave it to the chain. Walking `source()` blindly, as anyhow's `{:#}`
//! does, prints the first kind twice ("choosing the uplink interface: X: X").

use std::error::Error;

/// `err`'s message followed by each cause in its `source()` chain that the text so far
/// does not already contain.
pub fn error_chain(err: &(dyn Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if !message.is_empty() && !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("the root cause")]
    struct Root;

    #[derive(Debug, thiserror::Error)]
    enum Embeds {
        #[error("reading it: {0}")]
        Inner(#[from] Root),
    }

    #[derive(Debug, thiserror::Error)]
    #[error("doing the thing")]
    struct Chains(#[source] Root);

    #[test]
    fn each_cause_is_printed_once_whether_embedded_or_chained() {
        assert_eq!(
            error_chain(&Embeds::Inner(Root)),
            "reading it: the root cause"
        );
        assert_eq!(
            error_chain(&Chains(Root)),
            "doing the thing: the root cause"
        );
        let wrapped = anyhow::Error::new(Embeds::Inner(Root)).context("starting");
        assert_eq!(
            error_chain(wrapped.as_ref()),
            "starting: reading it: the root cause"
        );
    }
}
