//! Per-source limits: concurrent connections and new connections per second, per client address.
//!
//! A [`Limiter`] keeps one small entry per source (IPv4 address, v4-mapped IPv6 as IPv4, IPv6 grouped by
//! [`SourceLimits::ipv6_prefix`], /64 by default) in a table of [`SHARDS`] shards, each a mutex over a
//! `HashMap` of at most [`SHARD_ENTRIES`] entries.
//!
//! # The memory bound
//!
//! At most [`MAX_SOURCES`] (57,344) sources are tracked at once, and the table never holds more than
//! [`MAX_TABLE_BYTES`] (4,326,400 bytes, 4.1 MiB: 64 shards × 2,048 buckets × 33 bytes, plus 16 per
//! shard) however many distinct sources connect. Entries expire lazily: when a shard is full, every
//! entry that carries no state (no open connection, and its token bucket refilled) is dropped; if that
//! leaves it full, every entry with no open connection is dropped (those sources start again with a
//! full bucket: "treated as fresh").
//! An entry with an open connection is never dropped, since its count must be released. If a shard is
//! still full (all its sources hold connections), a new source is counted against the shard's one
//! *overflow* entry, shared by every such source: the limits then hold for them together, so growth
//! stays bounded and a flood of sources can only refuse itself.
//!
//! An entry whose source holds no connection and has no rate limit is removed when its last connection
//! ends.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

/// Shards of the table.
pub const SHARDS: usize = 64;
/// Entries a shard holds at most: 7/16 of 2,048 buckets, so that the map never grows past 2,048
/// buckets (it rehashes in place at up to half its capacity).
pub const SHARD_ENTRIES: usize = 896;
/// Sources tracked at once, at most.
pub const MAX_SOURCES: usize = SHARDS * SHARD_ENTRIES;
/// Buckets a shard's map may reach.
const SHARD_BUCKETS: usize = 2048;
/// The most bytes the table's maps hold: per bucket, one entry and one control byte.
pub const MAX_TABLE_BYTES: usize =
    SHARDS * (SHARD_BUCKETS * (std::mem::size_of::<(u128, Entry)>() + 1) + 16);

/// The largest [`SourceLimits::rate`]: a million new connections a second per source.
pub const MAX_RATE: u32 = 1_000_000;

/// Thousandths of a token, the unit of the bucket.
const MILLI: u64 = 1000;

/// Limits per source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SourceLimits {
    /// Concurrent connections per source (`None`: no cap).
    pub max_connections: Option<u32>,
    /// New connections per second per source, with a burst of as many (`None`: no rate limit).
    pub rate: Option<u32>,
    /// IPv6 sources are grouped by this prefix (1 to 128, default 64).
    pub ipv6_prefix: u8,
}

impl Default for SourceLimits {
    fn default() -> Self {
        SourceLimits {
            max_connections: None,
            rate: None,
            ipv6_prefix: 64,
        }
    }
}

impl SourceLimits {
    /// True when no limit is set.
    pub fn is_off(&self) -> bool {
        self.max_connections.is_none() && self.rate.is_none()
    }
}

/// Why a source was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It holds its maximum of concurrent connections.
    PerIpLimit,
    /// Its token bucket is empty.
    RateLimit,
}

/// One source's state: 32 bytes with its key.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    active: u32,
    /// Thousandths of a token.
    tokens: u32,
    /// When `tokens` was last brought up to date (ms since the limiter started, wrapping).
    at: u32,
}

#[derive(Debug)]
struct Shard {
    map: HashMap<u128, Entry>,
    overflow: Entry,
}

/// The per-source table of one service.
#[derive(Debug)]
pub struct Limiter {
    limits: SourceLimits,
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    started: Instant,
}

/// Holds one connection's place in its source's count; released when dropped.
#[derive(Debug)]
pub struct SourceGuard {
    limiter: Arc<Limiter>,
    shard: usize,
    /// `None`: counted against the shard's overflow entry.
    key: Option<u128>,
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        self.limiter.release(self.shard, self.key);
    }
}

impl Limiter {
    /// The table for these limits; `None` when none is set (nothing to do per connection).
    pub fn new(limits: SourceLimits) -> Option<Arc<Limiter>> {
        if limits.is_off() {
            return None;
        }
        let full = Entry {
            active: 0,
            tokens: 0,
            at: 0,
        };
        let mut limiter = Limiter {
            limits,
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        map: HashMap::new(),
                        overflow: full,
                    })
                })
                .collect(),
            hasher: RandomState::new(),
            started: Instant::now(),
        };
        let burst = limiter.burst();
        for shard in limiter.shards.iter_mut() {
            shard
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .overflow
                .tokens = burst;
        }
        Some(Arc::new(limiter))
    }

    /// The limits it applies.
    pub fn limits(&self) -> SourceLimits {
        self.limits
    }

    /// A source's key: an IPv4 address (v4-mapped IPv6 too) as its v4-mapped form, IPv6 masked to the
    /// prefix.
    pub fn key(&self, ip: IpAddr) -> u128 {
        match ip.to_canonical() {
            IpAddr::V4(a) => u128::from(a.to_ipv6_mapped()),
            IpAddr::V6(a) => {
                let len = u32::from(self.limits.ipv6_prefix.clamp(1, 128));
                u128::from(a) & (u128::MAX << (128 - len))
            }
        }
    }

    fn burst(&self) -> u32 {
        let rate = u64::from(self.limits.rate.unwrap_or(0).min(MAX_RATE));
        u32::try_from(rate * MILLI).unwrap_or(u32::MAX)
    }

    fn now(&self) -> u32 {
        // Wraps after 49 days: an entry last seen exactly a multiple of that ago refills less (once).
        self.started.elapsed().as_millis() as u32
    }

    /// Admits a new connection from `ip`, or says why not. The guard holds its count.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<SourceGuard, Refusal> {
        self.admit_at(ip, self.now())
    }

    /// [`admit`](Self::admit) at a given time (ms since the limiter started).
    pub fn admit_at(self: &Arc<Self>, ip: IpAddr, now: u32) -> Result<SourceGuard, Refusal> {
        let key = self.key(ip);
        let shard_ix = (self.hasher.hash_one(key) as usize) % SHARDS;
        let mut shard = self.shards[shard_ix]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let burst = self.burst();
        let tracked = if shard.map.contains_key(&key) {
            true
        } else {
            if shard.map.len() >= SHARD_ENTRIES {
                self.evict(&mut shard.map, now);
            }
            if shard.map.len() < SHARD_ENTRIES {
                shard.map.insert(
                    key,
                    Entry {
                        active: 0,
                        tokens: burst,
                        at: now,
                    },
                );
                true
            } else {
                false
            }
        };
        let s = &mut *shard;
        let entry = match tracked.then(|| s.map.get_mut(&key)).flatten() {
            Some(e) => e,
            None => &mut s.overflow,
        };
        self.take(entry, now)?;
        drop(shard);
        Ok(SourceGuard {
            limiter: Arc::clone(self),
            shard: shard_ix,
            key: tracked.then_some(key),
        })
    }

    /// Applies the limits to one entry, counting the connection when admitted.
    fn take(&self, entry: &mut Entry, now: u32) -> Result<(), Refusal> {
        if let Some(max) = self.limits.max_connections {
            if entry.active >= max {
                return Err(Refusal::PerIpLimit);
            }
        }
        if let Some(rate) = self.limits.rate {
            self.refill(entry, now, rate);
            if u64::from(entry.tokens) < MILLI {
                return Err(Refusal::RateLimit);
            }
            entry.tokens -= MILLI as u32;
        }
        entry.active = entry.active.saturating_add(1);
        Ok(())
    }

    fn refill(&self, entry: &mut Entry, now: u32, rate: u32) {
        let elapsed = u64::from(now.wrapping_sub(entry.at));
        // `rate` a second is `rate` thousandths a millisecond.
        let tokens = u64::from(entry.tokens) + elapsed * u64::from(rate.min(MAX_RATE));
        entry.tokens = tokens.min(u64::from(self.burst())) as u32;
        entry.at = now;
    }

    /// Makes room in a full shard: drops the entries that carry no state, or failing that every entry
    /// with no open connection.
    fn evict(&self, map: &mut HashMap<u128, Entry>, now: u32) {
        let burst = self.burst();
        let rate = self.limits.rate;
        map.retain(|_, e| {
            if e.active > 0 {
                return true;
            }
            match rate {
                None => false,
                Some(rate) => {
                    let mut e = *e;
                    self.refill(&mut e, now, rate);
                    e.tokens < burst
                }
            }
        });
        if map.len() >= SHARD_ENTRIES {
            map.retain(|_, e| e.active > 0);
        }
    }

    fn release(&self, shard: usize, key: Option<u128>) {
        let mut shard = self.shards[shard]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match key {
            None => shard.overflow.active = shard.overflow.active.saturating_sub(1),
            Some(key) => {
                let remove = match shard.map.get_mut(&key) {
                    Some(e) => {
                        e.active = e.active.saturating_sub(1);
                        e.active == 0 && self.limits.rate.is_none()
                    }
                    None => false,
                };
                if remove {
                    shard.map.remove(&key);
                }
            }
        }
    }

    /// Sources tracked now (the overflow entries not included).
    pub fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).map.len())
            .sum()
    }

    /// The bytes the shards' maps hold now, from their capacities: per bucket one entry and one control
    /// byte (hashbrown keeps its load at 7/8 of a power-of-two bucket count).
    pub fn table_bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let cap = s
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .map
                    .capacity();
                if cap == 0 {
                    0
                } else {
                    let buckets = (cap * 8).div_ceil(7).next_power_of_two();
                    buckets * (std::mem::size_of::<(u128, Entry)>() + 1) + 16
                }
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn limiter(max: Option<u32>, rate: Option<u32>) -> Arc<Limiter> {
        Limiter::new(SourceLimits {
            max_connections: max,
            rate,
            ipv6_prefix: 64,
        })
        .unwrap()
    }

    #[test]
    fn off_is_none() {
        assert!(Limiter::new(SourceLimits::default()).is_none());
    }

    #[test]
    fn concurrent_cap_per_source_released_by_the_guard() {
        let l = limiter(Some(2), None);
        let a: IpAddr = Ipv4Addr::new(127, 0, 0, 2).into();
        let b: IpAddr = Ipv4Addr::new(127, 0, 0, 3).into();
        let g1 = l.admit(a).unwrap();
        let _g2 = l.admit(a).unwrap();
        assert_eq!(l.admit(a).unwrap_err(), Refusal::PerIpLimit);
        // v4-mapped is the same source.
        assert_eq!(
            l.admit("::ffff:127.0.0.2".parse().unwrap()).unwrap_err(),
            Refusal::PerIpLimit
        );
        let _gb = l.admit(b).unwrap();
        drop(g1);
        let _g3 = l.admit(a).unwrap();
        drop((_g2, _g3, _gb));
        assert_eq!(l.tracked(), 0, "entries without state are removed");
    }

    #[test]
    fn ipv6_grouped_by_64() {
        let l = limiter(Some(1), None);
        let _g = l.admit("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert!(l.admit("2001:db8:1:2:ffff::9".parse().unwrap()).is_err());
        assert!(l.admit("2001:db8:1:3::1".parse().unwrap()).is_ok());
    }

    #[test]
    fn rate_bursts_then_refills() {
        let l = limiter(None, Some(5));
        let a: IpAddr = Ipv6Addr::LOCALHOST.into();
        for _ in 0..5 {
            drop(l.admit_at(a, 1000).unwrap());
        }
        assert_eq!(l.admit_at(a, 1000).unwrap_err(), Refusal::RateLimit);
        // 5 a second: one token every 200 ms.
        assert!(l.admit_at(a, 1199).is_err());
        assert!(l.admit_at(a, 1200).is_ok());
        assert!(l.admit_at(a, 1200).is_err());
        // Refilled to the burst, no more.
        for _ in 0..5 {
            assert!(l.admit_at(a, 60_000).is_ok());
        }
        assert!(l.admit_at(a, 60_000).is_err());
    }

    #[test]
    fn a_spray_of_100k_sources_stays_under_the_bound() {
        for (max, rate) in [(Some(4), None), (None, Some(10)), (Some(4), Some(10))] {
            let l = limiter(max, rate);
            let mut held = Vec::new();
            for i in 0..100_000u32 {
                let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
                let g = l.admit_at(ip, i / 100).unwrap();
                // A few hold their connection; most close at once.
                if i % 50 == 0 {
                    held.push(g);
                }
            }
            // And as many IPv6 /64s.
            for i in 0..100_000u128 {
                let ip = IpAddr::V6(Ipv6Addr::from((0x2001_0db8u128 << 96) | (i << 64)));
                drop(l.admit_at(ip, 1000 + (i / 100) as u32).unwrap());
            }
            assert!(l.tracked() <= MAX_SOURCES, "{} tracked", l.tracked());
            let bytes = l.table_bytes();
            assert!(
                bytes <= MAX_TABLE_BYTES,
                "{bytes} bytes > {MAX_TABLE_BYTES}"
            );
            eprintln!(
                "limits {max:?}/{rate:?}: {} sources tracked, {bytes} bytes (bound {MAX_TABLE_BYTES})",
                l.tracked()
            );
            drop(held);
            if rate.is_none() {
                assert_eq!(l.tracked(), 0);
            }
        }
    }

    #[test]
    fn a_full_shard_of_open_connections_counts_new_sources_together() {
        let l = limiter(Some(1_000_000), None);
        let mut held = Vec::new();
        // Enough sources holding a connection to fill every shard.
        for i in 0..(MAX_SOURCES as u32 * 2) {
            held.push(
                l.admit(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)))
                    .unwrap(),
            );
        }
        assert_eq!(l.tracked(), MAX_SOURCES);
        assert!(l.table_bytes() <= MAX_TABLE_BYTES);
        drop(held);
        assert_eq!(l.tracked(), 0);
        for s in l.shards.iter() {
            assert_eq!(s.lock().unwrap().overflow.active, 0, "overflow released");
        }
    }
}
