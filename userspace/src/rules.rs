//! The names of sluice's built-in rules: every decision that is not a
//! profile's own rule names one of these, so the decision log, `sluice log
//! --deny`, `policy replay` and the tests all speak of the same thing. The
//! module depends on nothing; each layer that decides imports its names
//! from here rather than writing the string itself.

/// Nothing in the profile allowed it.
pub const DEFAULT_DENY: &str = "default-deny";

// Connect phase: who the connection belongs to.
/// Reached the proxy without passing the kernel hooks.
pub const NO_FLOW_RECORD: &str = "no-flow-record";
/// A cgroup under an enforced parent that is not (yet) registered.
pub const UNKNOWN_SANDBOX: &str = "unknown-sandbox";
/// A REDIRECT listener's connection that conntrack knows nothing about.
pub const NO_ORIGINAL_DESTINATION: &str = "no-original-destination";
/// A sandbox connecting to one of sluice's own listeners.
pub const SLUICE_ITSELF: &str = "sluice-itself";

// Client hello phase: the first bytes and the names they claim.
/// The client sent nothing to classify.
pub const CLIENT_SILENT: &str = "client-silent";
/// The first bytes looked like TLS or HTTP but were not well formed.
pub const MALFORMED_REQUEST: &str = "malformed-request";
/// A claimed name contradicts what the sandbox resolved, or two names of
/// one request disagree.
pub const HOST_MISMATCH: &str = "host-mismatch";
/// Only a name nothing ties to the address would have allowed it.
pub const UNRESOLVED_NAME: &str = "unresolved-name";
/// A request that names no host at all.
pub const NO_HOST: &str = "no-host";
/// The TLS handshake with the sandboxed client failed.
pub const CLIENT_TLS: &str = "client-tls";

// Request phases.
/// An upgrade to anything but WebSocket.
pub const UPGRADE_REFUSED: &str = "upgrade-refused";
/// The client failed while its request was read.
pub const CLIENT_FAILED: &str = "client-failed";

// Upstream phase.
/// Opening the upstream connection failed (spliced connections).
pub const UPSTREAM_UNREACHABLE: &str = "upstream-unreachable";
/// The upstream's TLS certificate or handshake was refused.
pub const UPSTREAM_TLS: &str = "upstream-tls";
/// The upstream failed the request or its connection.
pub const UPSTREAM_FAILED: &str = "upstream-failed";

// Response head phase.
/// A response sluice cannot scrub of the secrets its request carried.
pub const UNSCRUBBABLE_RESPONSE: &str = "unscrubbable-response";

/// Rules decided before or beside a profile: their verdicts do not depend
/// on it (`policy replay` leaves them out of its comparison).
pub fn decided_outside_policy(rule: &str) -> bool {
    matches!(
        rule,
        HOST_MISMATCH
            | NO_HOST
            | UPSTREAM_FAILED
            | UPSTREAM_UNREACHABLE
            | MALFORMED_REQUEST
            | SLUICE_ITSELF
            | UNKNOWN_SANDBOX
    ) || rule.starts_with(CREDENTIAL_PREFIX)
}

// Credentials ([`crate::credentials::Leak`]).
/// What every credential rule starts with.
pub const CREDENTIAL_PREFIX: &str = "credential-";
pub const CREDENTIAL_EXFILTRATION: &str = "credential-exfiltration";
pub const CREDENTIAL_SCOPE: &str = "credential-scope";
pub const CREDENTIAL_CLEARTEXT: &str = "credential-cleartext";
pub const CREDENTIAL_MISSING: &str = "credential-missing";
pub const CREDENTIAL_REVOKED: &str = "credential-revoked";
pub const CREDENTIAL_INVALID: &str = "credential-invalid";

// Limits ([`crate::proxy::limits::Limit`]).
pub const LIMIT_CONNECTIONS: &str = "limit-connections";
pub const LIMIT_CONNECTION_RATE: &str = "limit-connection-rate";
pub const LIMIT_DESCRIPTORS: &str = "limit-descriptors";
pub const LIMIT_APPROVALS: &str = "limit-approvals";

// The resolver.
pub const DNS_RATE_LIMIT: &str = "dns-rate-limit";
pub const DNS_TUNNEL_SHAPE: &str = "dns-tunnel-shape";
pub const DNS_REFUSED: &str = "dns-refused";

// The kernel programs and the tamper guard.
pub const KERNEL_SOCKET: &str = "kernel-socket";
pub const KERNEL_EGRESS: &str = "kernel-egress";
pub const KERNEL_UDP: &str = "kernel-udp";
pub const KERNEL_LINKS_HEALED: &str = "kernel-links-healed";
pub const TAMPER_BPF: &str = "tamper-bpf";
pub const TAMPER_PTRACE: &str = "tamper-ptrace";
pub const TAMPER_PERF: &str = "tamper-perf";
pub const TAMPER_KERNEL_LOAD: &str = "tamper-kernel-load";
pub const TAMPER_MOUNT: &str = "tamper-mount";
pub const TAMPER_CGROUP_ESCAPE: &str = "tamper-cgroup-escape";
pub const TAMPER_TASKS_FULL: &str = "tamper-tasks-full";
pub const TAMPER_CLONE: &str = "tamper-clone";
pub const TAMPER_IO_URING: &str = "tamper-io-uring";

// Lifecycle records (verdict `info`): what changed, not what was decided.
pub const SECRETS_RELOADED: &str = "secrets-reloaded";
pub const SECRET_SET: &str = "secret-set";
pub const SECRET_REVOKED: &str = "secret-revoked";
pub const PROFILE_CHANGED: &str = "profile-changed";
pub const PROFILE_RELABELLED: &str = "profile-relabelled";
pub const PROFILE_RELOADED: &str = "profile-reloaded";
pub const PROFILE_RELOAD_FAILED: &str = "profile-reload-failed";
pub const BUNDLE_REVOKED: &str = "bundle-revoked";
pub const BUNDLE_RESTORED: &str = "bundle-restored";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_decided_outside_a_profile() {
        assert!(decided_outside_policy(HOST_MISMATCH));
        assert!(decided_outside_policy(CREDENTIAL_REVOKED));
        assert!(!decided_outside_policy(DEFAULT_DENY));
        assert!(!decided_outside_policy("deny-internal-networks"));
    }

    #[test]
    fn credential_rules_share_their_prefix() {
        for rule in [
            CREDENTIAL_EXFILTRATION,
            CREDENTIAL_SCOPE,
            CREDENTIAL_CLEARTEXT,
            CREDENTIAL_MISSING,
            CREDENTIAL_REVOKED,
            CREDENTIAL_INVALID,
        ] {
            assert!(rule.starts_with(CREDENTIAL_PREFIX), "{rule}");
        }
    }
}
