//! The hash maps of the per-message path. std's SipHash-1-3 was ~5 % of the plugin's own time
//! on the broker thread (`perf` of `make bench`): a message looks its device up in the
//! registry, the replay memory (twice) and the per-device counts, and its id in the device's id
//! set, and each READ/WRITE check looks its connection up.
//!
//! aHash is as much a keyed hash as SipHash is here: its keys come from OpenSSL's random
//! generator once per process, so names and message ids cannot be chosen to collide (the id
//! set holds what an authenticated device sends; a registry lookup is for any name a client
//! claims).

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::OnceLock;

/// A `HashMap` keyed per process.
pub type Map<K, V> = HashMap<K, V, Keyed>;
/// A `HashSet` keyed per process.
pub type Set<K> = HashSet<K, Keyed>;

/// aHash with this process's random keys.
#[derive(Clone)]
pub struct Keyed(ahash::RandomState);

impl Default for Keyed {
    fn default() -> Self {
        static KEYS: OnceLock<[u64; 4]> = OnceLock::new();
        let k = KEYS.get_or_init(|| {
            let mut bytes = [0u8; 32];
            // Without the system's randomness nothing here is trustworthy anyway (TLS needs
            // it); std's own keys are the fallback, so the keys are never constant.
            if openssl::rand::rand_bytes(&mut bytes).is_err() {
                let std_keyed = std::collections::hash_map::RandomState::new();
                for (i, chunk) in bytes.chunks_mut(8).enumerate() {
                    chunk.copy_from_slice(&std_keyed.hash_one(i).to_le_bytes());
                }
            }
            let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
            [word(0), word(1), word(2), word(3)]
        });
        Keyed(ahash::RandomState::with_seeds(k[0], k[1], k[2], k[3]))
    }
}

impl BuildHasher for Keyed {
    type Hasher = ahash::AHasher;

    fn build_hasher(&self) -> ahash::AHasher {
        self.0.build_hasher()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_not_the_fixed_ones_and_are_shared_by_the_maps() {
        let (a, b) = (Keyed::default(), Keyed::default());
        // Same process: the same keys, so the same hash.
        assert_eq!(a.hash_one("sensor_001"), b.hash_one("sensor_001"));
        // Not aHash's fixed default keys (positive control: those would give this hash).
        let fixed = ahash::RandomState::with_seeds(0, 0, 0, 0);
        assert_ne!(a.hash_one("sensor_001"), fixed.hash_one("sensor_001"));
        let mut m: Map<Box<str>, u32> = Map::default();
        m.insert("sensor_001".into(), 1);
        assert_eq!(m.get("sensor_001"), Some(&1));
        assert_eq!(m.get("sensor_002"), None);
    }
}
