//! A network namespace the test creates for itself, joined to the test's own namespace by a
//! veth pair, so a process started inside it can be cut off the network (and reconnected)
//! while it keeps running. Needs CAP_NET_ADMIN (root in CI).

use std::net::Ipv4Addr;
use std::process::Command;

/// The namespace `elbo-test-PID`, its veth pair and a /30 of 198.18.0.0/15 (the block RFC 2544
/// sets aside for benchmarks, never routed): this side is `.1`, the namespace `.2`. The pair
/// and the namespace are removed on drop.
pub struct Netns {
    name: String,
    host_if: String,
    inside_if: String,
    /// This side's end of the pair.
    pub host_ip: Ipv4Addr,
    /// The namespace's end.
    pub inside_ip: Ipv4Addr,
}

impl Netns {
    /// Creates the namespace and the link, up; why not, when this process may not.
    pub fn create() -> Result<Self, String> {
        let pid = std::process::id();
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (pid % 32_768) * 4;
        let ns = Netns {
            name: format!("elbo-test-{pid}"),
            host_if: format!("elbo{pid}h"),
            inside_if: format!("elbo{pid}n"),
            host_ip: Ipv4Addr::from(base + 1),
            inside_ip: Ipv4Addr::from(base + 2),
        };
        // A leftover of a killed run with the same pid would make the setup fail.
        ns.remove();
        ns.ip(&["netns", "add", &ns.name])?;
        ns.ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.inside_if,
            "netns",
            &ns.name,
        ])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &ns.host_if,
        ])?;
        ns.inside(&[
            "addr",
            "add",
            &format!("{}/30", ns.inside_ip),
            "dev",
            &ns.inside_if,
        ])?;
        ns.inside(&["link", "set", "lo", "up"])?;
        ns.set_links("up")?;
        Ok(ns)
    }

    /// `program` to be started inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Takes both ends of the link down: packets either way are dropped, nothing is reset.
    pub fn cut(&self) {
        self.set_links("down").unwrap();
    }

    /// Brings both ends back up (the addresses and their routes come back with them).
    pub fn mend(&self) {
        self.set_links("up").unwrap();
    }

    fn set_links(&self, state: &str) -> Result<(), String> {
        self.ip(&["link", "set", &self.host_if, state])?;
        self.inside(&["link", "set", &self.inside_if, state])
    }

    fn ip(&self, args: &[&str]) -> Result<(), String> {
        let out = Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("cannot run ip: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    fn inside(&self, args: &[&str]) -> Result<(), String> {
        self.ip(&[&["-n", &self.name][..], args].concat())
    }

    fn remove(&self) {
        let _ = self.ip(&["link", "del", &self.host_if]);
        let _ = self.ip(&["netns", "del", &self.name]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.remove();
    }
}
