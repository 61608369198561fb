//! Where alert deliveries may go. An endpoint URL is given by an API caller, and tally posts to
//! it from inside the network it runs in: unchecked, that is a way to reach what only tally can
//! reach (the cloud's metadata service at 169.254.169.254, Postgres, an admin port on
//! loopback), and, through the delivery statuses the API reports, a port scanner.
//!
//! So by default ([`Destinations`], `[alerts]` in tally.toml):
//! - only `https://` (an `http://` endpoint would also carry the signed payload in clear);
//! - never an address that is not public: loopback, private ranges, link-local, carrier-grade
//!   NAT, unique local, multicast, documentation, the unspecified address, and IPv6 forms that
//!   embed one of those (mapped, compatible, NAT64, 6to4);
//! - never a name that only has meaning inside a network (`localhost`, `*.local`,
//!   `*.internal`, a name without a dot, ...), nor a host written as a number in one of the
//!   forms resolvers accept (`2130706433`, `0x7f.1`, `127.1`).
//!
//! Checked twice: at registration (by what the URL says), and at every delivery after the name
//! is resolved (a name can resolve to another address later: the connector refuses to connect
//! to an address the policy refuses, whatever the name). `allow_http` and
//! `allow_private_networks` open these up for on-premises receivers.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::Name;

/// What the operator allows (`[alerts] allow_http`, `allow_private_networks`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Destinations {
    pub allow_http: bool,
    pub allow_private_networks: bool,
}

impl Destinations {
    /// Checks an endpoint URL as registered: `Err` says what is refused and how to allow it.
    pub fn check_url(&self, url: &str) -> Result<(), String> {
        if url.len() > 2000 {
            return Err(format!(
                "url {:?} is longer than 2000 characters",
                shorten(url)
            ));
        }
        let uri: http::Uri = url
            .parse()
            .map_err(|_| format!("url {:?} is not a URL", shorten(url)))?;
        // Lowercase as written: the table's check (and receivers' logs) expect it.
        let https = url.starts_with("https://");
        if !(https || url.starts_with("http://")) || uri.host().is_none_or(str::is_empty) {
            return Err(format!(
                "url {:?} must be an https:// URL with a host",
                shorten(url)
            ));
        }
        if !https && !self.allow_http {
            return Err(format!(
                "url {:?} is http://: deliveries (and their signatures) would travel in clear; use https://, or set alerts.allow_http = true for a receiver on a private network",
                shorten(url)
            ));
        }
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(format!(
                "url {:?} carries a user name or password; put credentials in the receiver's own configuration, not in the URL",
                shorten(url)
            ));
        }
        if self.allow_private_networks {
            return Ok(());
        }
        let host = uri.host().unwrap_or_default();
        match host_kind(host) {
            Host::Address(address) if !is_public(address) => Err(format!(
                "url {:?} points at {address}, which is not a public address; alerts.allow_private_networks = true allows it (for receivers inside your network)",
                shorten(url)
            )),
            Host::Address(_) => Ok(()),
            Host::InternalName => Err(format!(
                "url {:?} names a host that only resolves inside a network ({host}); use the receiver's public name, or set alerts.allow_private_networks = true",
                shorten(url)
            )),
            Host::Name => Ok(()),
        }
    }

    /// Whether a delivery may connect to `address` (after resolution).
    pub fn allows(&self, address: IpAddr) -> bool {
        self.allow_private_networks || is_public(address)
    }
}

fn shorten(text: &str) -> String {
    text.chars().take(100).collect()
}

enum Host {
    Address(IpAddr),
    /// A name with meaning only inside a network.
    InternalName,
    Name,
}

/// What a URL's host is: an address in any form a resolver would take as one, a name that is
/// internal by its form, or a name.
fn host_kind(host: &str) -> Host {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        // An IPv6 literal (a zone id, `%eth0`, makes it link-local anyway).
        return match inner
            .split('%')
            .next()
            .unwrap_or_default()
            .parse::<Ipv6Addr>()
        {
            Ok(v6) => Host::Address(IpAddr::V6(v6)),
            Err(_) => Host::InternalName,
        };
    }
    if let Some(v4) = inet_aton(&host) {
        return Host::Address(IpAddr::V4(v4));
    }
    const INTERNAL_SUFFIXES: [&str; 8] = [
        ".localhost",
        ".local",
        ".localdomain",
        ".internal",
        ".intranet",
        ".lan",
        ".home.arpa",
        ".corp",
    ];
    if host == "localhost"
        || !host.contains('.')
        || INTERNAL_SUFFIXES.iter().any(|s| host.ends_with(s))
    {
        return Host::InternalName;
    }
    Host::Name
}

/// An IPv4 address as the C library's `inet_aton` (and so `getaddrinfo`) reads one: one to
/// four parts, each decimal, octal (`0` first) or hex (`0x` first), the last filling the
/// remaining bytes: `2130706433`, `0x7f.1` and `127.1` are all 127.0.0.1.
fn inet_aton(host: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = host.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut values = Vec::with_capacity(parts.len());
    for part in &parts {
        let value = if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
            if hex.is_empty() {
                0
            } else {
                u64::from_str_radix(hex, 16).ok()?
            }
        } else if part.len() > 1 && part.starts_with('0') {
            u64::from_str_radix(&part[1..], 8).ok()?
        } else {
            part.parse::<u64>().ok()?
        };
        values.push(value);
    }
    let (last, leading) = values.split_last()?;
    if leading.iter().any(|&v| v > 255) {
        return None;
    }
    let rest_bits = 8 * (4 - leading.len() as u32);
    if rest_bits < 64 && *last >= 1u64 << rest_bits {
        return None;
    }
    let mut address: u32 = 0;
    for (i, &v) in leading.iter().enumerate() {
        address |= (v as u32) << (24 - 8 * i as u32);
    }
    address |= *last as u32;
    Some(Ipv4Addr::from(address))
}

/// Whether an address is on the public internet.
pub fn is_public(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(v4: Ipv4Addr) -> bool {
    let [a, b, c, _] = v4.octets();
    !(v4.is_unspecified()
        || a == 0 // "this network"
        || v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || (a == 100 && (64..128).contains(&b)) // carrier-grade NAT
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 192 && b == 0 && c == 2) // documentation
        || (a == 198 && b == 51 && c == 100)
        || (a == 203 && b == 0 && c == 113)
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || (a == 192 && b == 88 && c == 99) // 6to4 relay anycast
        || v4.is_multicast()
        || a >= 240) // reserved, broadcast
}

fn is_public_v6(v6: Ipv6Addr) -> bool {
    let segments = v6.segments();
    // Forms that carry an IPv4 address: judged by it.
    if let Some(v4) = v6.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    if segments[..6] == [0, 0, 0, 0, 0, 0] && !v6.is_loopback() && !v6.is_unspecified() {
        // IPv4-compatible (deprecated): ::a.b.c.d
        return is_public_v4(Ipv4Addr::from(
            (u32::from(segments[6]) << 16) | u32::from(segments[7]),
        ));
    }
    if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || segments[..6] == [0, 0, 0, 0, 0xffff, 0] {
        // NAT64 (64:ff9b::a.b.c.d) and IPv4-translated (::ffff:0:a.b.c.d)
        return is_public_v4(Ipv4Addr::from(
            (u32::from(segments[6]) << 16) | u32::from(segments[7]),
        ));
    }
    if segments[..3] == [0x64, 0xff9b, 1] {
        // Local-use NAT64 (64:ff9b:1::/48): a network's own translator, private by definition
        return false;
    }
    if segments[0] == 0x2002 {
        // 6to4: 2002:a.b.c.d::/48
        return is_public_v4(Ipv4Addr::from(
            (u32::from(segments[1]) << 16) | u32::from(segments[2]),
        ));
    }
    !(v6.is_unspecified()
        || v6.is_loopback()
        || (segments[0] & 0xfe00) == 0xfc00 // unique local
        || (segments[0] & 0xffc0) == 0xfe80 // link-local
        || (segments[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
        || v6.is_multicast()
        || (segments[0] == 0x2001 && segments[1] == 0x0db8) // documentation
        || (segments[0] == 0x0100 && segments[1..4] == [0, 0, 0]) // discard
        || (segments[0] == 0x2001 && segments[1] < 0x0200)) // Teredo, ORCHID, benchmarking, ...
}

/// How the sender resolves names: the system's resolver, or (tests) a fixed answer.
pub type Resolve = Arc<dyn Fn(&str) -> std::io::Result<Vec<IpAddr>> + Send + Sync>;

/// The connector's resolver: resolves, then keeps only the addresses the policy allows, so a
/// name that resolves (now) to a private address is never connected to.
#[derive(Clone)]
pub(crate) struct GuardedResolver {
    pub(crate) destinations: Destinations,
    pub(crate) resolve: Option<Resolve>,
}

impl tower::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addresses: Vec<IpAddr> = match &this.resolve {
                Some(resolve) => resolve(&host)?,
                None => tokio::net::lookup_host((host.as_str(), 0))
                    .await?
                    .map(|a| a.ip())
                    .collect(),
            };
            let allowed: Vec<SocketAddr> = addresses
                .iter()
                .filter(|a| this.destinations.allows(**a))
                .map(|a| SocketAddr::new(*a, 0))
                .collect();
            if allowed.is_empty() {
                // Which private address is not said: the error is the delivery's, readable
                // through the API, and would map the internal network's names.
                let what = if addresses.is_empty() {
                    "resolves to nothing"
                } else {
                    "resolves only to addresses that are not public"
                };
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("{host} {what} (alerts.allow_private_networks is off)"),
                ));
            }
            Ok(allowed.into_iter())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(url: &str) -> String {
        Destinations::default().check_url(url).unwrap_err()
    }

    #[test]
    fn every_address_class_that_is_not_public_is_refused_at_registration() {
        for url in [
            "https://127.0.0.1/hook",
            "https://127.8.9.10/hook",
            "https://10.1.2.3/hook",
            "https://172.16.0.1/hook",
            "https://172.31.255.255/hook",
            "https://192.168.1.1/hook",
            "https://169.254.169.254/latest/meta-data/",
            "https://100.64.0.1/hook",
            "https://0.0.0.0/hook",
            "https://224.0.0.1/hook",
            "https://255.255.255.255/hook",
            "https://192.0.2.7/hook",
            "https://[::1]/hook",
            "https://[::]/hook",
            "https://[fe80::1%25eth0]/hook",
            "https://[fd00::1]/hook",
            "https://[fc00::1]/hook",
            "https://[::ffff:127.0.0.1]/hook",
            "https://[::ffff:a9fe:a9fe]/hook",
            "https://[64:ff9b::a9fe:a9fe]/hook",
            "https://[64:ff9b:1::a9fe:a9fe]/hook",
            "https://[::ffff:0:a9fe:a9fe]/hook",
            "https://[2002:7f00:1::]/hook",
            "https://[::127.0.0.1]/hook",
            "https://[ff02::1]/hook",
            // Numbers a resolver reads as an address.
            "https://2130706433/hook",
            "https://0x7f.1/hook",
            "https://0177.0.0.1/hook",
            "https://127.1/hook",
            "https://0x7f000001/hook",
            "https://127.0.0.1./hook",
        ] {
            let error = refused(url);
            assert!(error.contains("not a public address"), "{url}: {error}");
        }
        for url in [
            "https://localhost/hook",
            "https://LOCALHOST./hook",
            "https://api.localhost/hook",
            "https://metadata.google.internal/computeMetadata/v1/",
            "https://printer.local/hook",
            "https://intranet/hook",
            "https://db.corp/hook",
            "https://router.home.arpa/hook",
        ] {
            let error = refused(url);
            assert!(
                error.contains("only resolves inside a network"),
                "{url}: {error}"
            );
        }
        assert!(refused("http://hooks.example.com/x").contains("alerts.allow_http"));
        assert!(refused("https://user:pw@hooks.example.com/x").contains("password"));
        assert!(refused("ftp://hooks.example.com/x").contains("https://"));
        assert!(refused("https:///x").contains("https://"));
    }

    #[test]
    fn public_addresses_and_names_pass_and_an_operator_can_open_up() {
        let default = Destinations::default();
        for url in [
            "https://hooks.example.com/tally",
            "https://93.184.216.34/hook",
            "https://[2606:4700::1111]/hook",
            "https://hooks.example.com:8443/x?y=1",
        ] {
            assert_eq!(default.check_url(url), Ok(()), "{url}");
        }
        let open = Destinations {
            allow_http: true,
            allow_private_networks: true,
        };
        assert_eq!(open.check_url("http://127.0.0.1:9000/hook"), Ok(()));
        assert_eq!(open.check_url("http://localhost/hook"), Ok(()));
        assert!(open.allows("10.0.0.1".parse().unwrap()));
        assert!(!default.allows("10.0.0.1".parse().unwrap()));
        assert!(default.allows("8.8.8.8".parse().unwrap()));
    }

    #[test]
    fn inet_aton_reads_what_resolvers_read() {
        let ip = |s: &str| inet_aton(s).map(|a| a.to_string());
        assert_eq!(ip("2130706433").as_deref(), Some("127.0.0.1"));
        assert_eq!(ip("0x7f.1").as_deref(), Some("127.0.0.1"));
        assert_eq!(ip("127.1").as_deref(), Some("127.0.0.1"));
        assert_eq!(ip("10.1.65535").as_deref(), Some("10.1.255.255"));
        assert_eq!(ip("0177.0.0.01").as_deref(), Some("127.0.0.1"));
        assert_eq!(ip("256.0.0.1"), None);
        assert_eq!(ip("1.2.3.4.5"), None);
        assert_eq!(ip("example.com"), None);
        assert_eq!(ip("4294967296"), None);
        assert_eq!(ip("08.0.0.1"), None);
    }
}
