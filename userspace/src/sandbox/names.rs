//! Per-sandbox memory of the names it resolved through sluice, so a later
//! connect to an address can be attributed to the name that led there.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// Clients keep addresses longer than tiny TTLs say (connection pools,
/// runtime caches), so an answer is remembered at least this long.
const MIN_MEMORY: Duration = Duration::from_mins(5);
const MAX_MEMORY: Duration = Duration::from_hours(24);
/// Bound on remembered addresses per sandbox; expired ones go first.
const MAX_ADDRESSES: usize = 8192;

/// Names an address was resolved from, each with when it is forgotten.
type Names = Vec<(Arc<str>, Instant)>;

#[derive(Default)]
pub struct NameMemory {
    by_ip: Mutex<HashMap<IpAddr, Names>>,
}

impl NameMemory {
    pub fn remember(&self, name: &str, ip: IpAddr, ttl: Duration) {
        self.remember_at(name, ip, ttl, Instant::now());
    }

    fn remember_at(&self, name: &str, ip: IpAddr, ttl: Duration, now: Instant) {
        let expires = now + ttl.clamp(MIN_MEMORY, MAX_MEMORY);
        let mut by_ip = self.by_ip.lock().expect("lock poisoned");
        if by_ip.len() >= MAX_ADDRESSES && !by_ip.contains_key(&ip) {
            by_ip.retain(|_, names| {
                names.retain(|(_, until)| *until > now);
                !names.is_empty()
            });
            if by_ip.len() >= MAX_ADDRESSES {
                // Still full of live entries: forget the one expiring first.
                if let Some(oldest) =
                    by_ip.iter().min_by_key(|(_, names)| names.iter().map(|(_, until)| *until).max()).map(|(ip, _)| *ip)
                {
                    by_ip.remove(&oldest);
                }
            }
        }
        let names = by_ip.entry(ip).or_default();
        match names.iter_mut().find(|(known, _)| &**known == name) {
            Some((_, until)) => *until = (*until).max(expires),
            None => names.push((Arc::from(name), expires)),
        }
    }

    /// Names that resolved to `ip` and are still remembered, most recent last.
    pub fn names_for(&self, ip: IpAddr) -> Vec<Arc<str>> {
        self.names_for_at(ip, Instant::now())
    }

    /// An address the sandbox resolved `name` to and still remembers.
    pub fn address_of(&self, name: &str) -> Option<IpAddr> {
        let now = Instant::now();
        let name = name.trim_end_matches('.');
        let by_ip = self.by_ip.lock().expect("lock poisoned");
        by_ip
            .iter()
            .find(|(_, names)| names.iter().any(|(known, until)| *until > now && known.eq_ignore_ascii_case(name)))
            .map(|(ip, _)| *ip)
    }

    /// Whether a name a client claims for `ip` agrees with what the sandbox
    /// resolved through sluice: it resolved nothing for `ip`, or this name.
    /// On disagreement, the names it did resolve.
    pub fn agrees(&self, ip: IpAddr, name: &str) -> Result<(), Vec<Arc<str>>> {
        let resolved = self.names_for(ip);
        if resolved.is_empty() || resolved.iter().any(|known| known.eq_ignore_ascii_case(name)) {
            Ok(())
        } else {
            Err(resolved)
        }
    }

    fn names_for_at(&self, ip: IpAddr, now: Instant) -> Vec<Arc<str>> {
        let by_ip = self.by_ip.lock().expect("lock poisoned");
        by_ip
            .get(&ip)
            .map(|names| names.iter().filter(|(_, until)| *until > now).map(|(name, _)| name.clone()).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_names_by_address_until_they_expire() {
        let memory = NameMemory::default();
        let ip: IpAddr = "198.18.0.10".parse().unwrap();
        let now = Instant::now();
        memory.remember_at("docs.demo.test", ip, Duration::from_secs(1), now);
        memory.remember_at("cdn.demo.test", ip, Duration::from_hours(1), now);
        let names: Vec<String> = memory.names_for_at(ip, now).iter().map(ToString::to_string).collect();
        assert_eq!(names, ["docs.demo.test", "cdn.demo.test"]);
        // A one-second TTL is still remembered for the minimum period...
        assert_eq!(memory.names_for_at(ip, now + Duration::from_secs(299)).len(), 2);
        // ...and then forgotten, while the longer one stays.
        let later: Vec<String> =
            memory.names_for_at(ip, now + Duration::from_secs(301)).iter().map(ToString::to_string).collect();
        assert_eq!(later, ["cdn.demo.test"]);
        assert!(memory.names_for_at("198.18.0.11".parse().unwrap(), now).is_empty());
    }

    #[test]
    fn stays_bounded() {
        let memory = NameMemory::default();
        let now = Instant::now();
        for i in 0..(MAX_ADDRESSES as u32 + 10) {
            memory.remember_at("many.test", IpAddr::from(i.to_be_bytes()), Duration::from_mins(1), now);
        }
        assert!(memory.by_ip.lock().unwrap().len() <= MAX_ADDRESSES);
    }
}
