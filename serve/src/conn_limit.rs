//! Open connections per client IP address and in total: one address cannot hold all of a
//! listener's connections, and all addresses together cannot hold all of the process's
//! file descriptors. Over either limit a new connection is refused at once.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

/// Counts of open connections per address, shared by a listener's connections.
#[derive(Clone)]
pub struct ConnLimit {
    per_ip: usize,
    total: usize,
    open: Arc<Mutex<Counts>>,
}

#[derive(Default)]
struct Counts {
    by_ip: HashMap<IpAddr, usize>,
    total: usize,
}

/// One connection's place in the count, released on drop.
pub struct Slot {
    ip: IpAddr,
    open: Arc<Mutex<Counts>>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The address already holds its share.
    PerAddress,
    /// The listener is full.
    Total,
}

impl ConnLimit {
    /// At most `per_ip` connections from one address; no total cap.
    pub fn new(per_ip: usize) -> Self {
        Self::with_total(per_ip, usize::MAX)
    }

    /// At most `per_ip` connections from one address and `total` in all.
    pub fn with_total(per_ip: usize, total: usize) -> Self {
        Self {
            per_ip: per_ip.max(1),
            total: total.max(1),
            open: Arc::default(),
        }
    }

    /// A slot for a new connection from `ip`, or why not.
    pub fn try_take(&self, ip: IpAddr) -> Result<Slot, Refused> {
        let mut c = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if c.total >= self.total {
            return Err(Refused::Total);
        }
        let n = c.by_ip.entry(ip).or_insert(0);
        if *n >= self.per_ip {
            return Err(Refused::PerAddress);
        }
        *n += 1;
        c.total += 1;
        Ok(Slot {
            ip,
            open: self.open.clone(),
        })
    }

    /// A slot for a new connection from `ip`, or `None` when over a limit.
    pub fn take(&self, ip: IpAddr) -> Option<Slot> {
        self.try_take(ip).ok()
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.open.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.by_ip.remove(&self.ip);
            }
        }
    }
}

/// The client address of a connection (what HTTP handlers get as `ConnectInfo`).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_per_address_and_released() {
        let l = ConnLimit::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = l.take(a).unwrap();
        let _s2 = l.take(a).unwrap();
        assert_eq!(l.try_take(a).err(), Some(Refused::PerAddress));
        assert!(l.take(b).is_some());
        drop(s1);
        assert!(l.take(a).is_some());
    }

    #[test]
    fn the_total_caps_all_addresses_together() {
        let l = ConnLimit::with_total(2, 3);
        let ips: Vec<IpAddr> = (1..=4)
            .map(|i| format!("10.0.0.{i}").parse().unwrap())
            .collect();
        let held: Vec<Slot> = ips[..3].iter().map(|ip| l.take(*ip).unwrap()).collect();
        assert_eq!(l.open(), 3);
        assert_eq!(l.try_take(ips[3]).err(), Some(Refused::Total));
        drop(held);
        assert_eq!(l.open(), 0);
        assert!(l.take(ips[3]).is_some());
    }
}
