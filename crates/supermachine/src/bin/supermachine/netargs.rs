//! The network options `run` and `snapshot create` share.

use clap::Args;
use supermachine::{Error, Network, NetworkMode, PolicyMode, Result};

#[derive(Args, Clone, Debug, Default)]
pub struct NetworkArgs {
    /// The guest's network: passt (user-mode, needs no root; the default
    /// when installed), none (loopback only), stream:PATH (a socket
    /// speaking QEMU's stream framing: gvproxy, a passt of your own) or
    /// dgram:PATH (one frame per datagram).
    #[arg(long = "network", value_name = "MODE")]
    pub mode: Option<String>,
    /// What may leave the VM: open (the default), deny-private (no
    /// private, link-local, loopback or host addresses), allow-list (only
    /// --network-allow) or deny-list (all but --network-deny).
    #[arg(long = "network-policy", value_name = "POLICY")]
    pub policy: Option<String>,
    /// CIDR[:PORT[-PORT]] that may go out whatever the policy ([IPv6
    /// CIDR]:PORT). Repeatable.
    #[arg(long = "network-allow", value_name = "RULE")]
    pub allow: Vec<String>,
    /// CIDR[:PORT[-PORT]] that may not go out. Repeatable.
    #[arg(long = "network-deny", value_name = "RULE")]
    pub deny: Vec<String>,
    /// A DNS server for the guest's /etc/resolv.conf, instead of the
    /// host's resolver through passt. Repeatable.
    #[arg(long = "dns", value_name = "ADDRESS")]
    pub dns: Vec<String>,
    /// An /etc/hosts entry. Repeatable.
    #[arg(long = "add-host", value_name = "NAME:ADDRESS")]
    pub add_hosts: Vec<String>,
}

impl NetworkArgs {
    /// The network these options describe.
    pub fn network(&self) -> Result<Network> {
        let bad =
            |what: &str, e: &dyn std::fmt::Display| Error::InvalidOption(format!("{what}: {e}"));
        let mode: NetworkMode = match &self.mode {
            Some(m) => m.parse()?,
            None => NetworkMode::Auto,
        };
        let policy: PolicyMode = match &self.policy {
            Some(p) => p.parse().map_err(|e| bad("--network-policy", &e))?,
            None => PolicyMode::Open,
        };
        let rules = |list: &[String], flag: &str| {
            list.iter()
                .map(|r| r.parse().map_err(|e| bad(flag, &e)))
                .collect::<Result<Vec<_>>>()
        };
        let network = Network {
            mode,
            policy,
            allow: rules(&self.allow, "--network-allow")?,
            deny: rules(&self.deny, "--network-deny")?,
            dns: self
                .dns
                .iter()
                .map(|a| {
                    a.parse().map_err(|_| {
                        Error::InvalidOption(format!("--dns {a:?}: not an IP address"))
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            hosts: self
                .add_hosts
                .iter()
                .map(|h| supermachine::parse_host_entry(h))
                .collect::<Result<Vec<_>>>()?,
            passt: None,
        };
        if network.mode == NetworkMode::None {
            let given = self.policy.is_some()
                || !self.allow.is_empty()
                || !self.deny.is_empty()
                || !self.dns.is_empty();
            if given {
                return Err(Error::InvalidOption(
                    "--network none has no traffic for --network-policy, --network-allow, --network-deny or --dns".into(),
                ));
            }
        }
        if policy == PolicyMode::AllowList && network.allow.is_empty() {
            return Err(Error::InvalidOption(
                "--network-policy allow-list needs at least one --network-allow".into(),
            ));
        }
        Ok(network)
    }
}
