//! Maglev lookup tables (Eisenbud et al., NSDI 2016): each backend walks its own
//! permutation of the table's positions, taking turns, until every position is filled. Every
//! backend gets M/N positions (±1); removing one of N backends moves about 1/N of the
//! positions (the ones it held, and few others). Built from the backends' names (address and
//! port), so every node builds the same table for the same set.

/// The table size for `backends`: the first size of a fixed ladder (the largest prime below
/// each power of two: 7, 13, 31, ..., 509, 1021, ...) that gives each at least
/// `per_backend` positions, but not above `max` (then the largest prime not above `max`).
/// A ladder rather than the smallest fitting prime: the size must not change when one
/// backend comes or goes (a new size reshuffles every flow), and it must be a function of
/// the set alone, so that every node builds the same table.
pub fn table_size(backends: usize, per_backend: u32, max: u32) -> u32 {
    let want = backends as u64 * per_backend as u64;
    let cap = (2..=max).rev().find(|n| is_prime(*n)).unwrap_or(2);
    (3..32)
        .map(|k| (2..1u32 << k).rev().find(|n| is_prime(*n)).unwrap_or(2))
        .find(|p| *p as u64 >= want || *p >= cap)
        .map_or(cap, |p| p.min(cap))
}

fn is_prime(n: u32) -> bool {
    n >= 2 && (2..).take_while(|d: &u32| (*d as u64) * (*d as u64) <= n as u64).all(|d| !n.is_multiple_of(d))
}

/// The table of size `m` (a prime) for backends with these names: for each position, the
/// index of its backend in `names`. Empty for no backends.
pub fn table(names: &[String], m: u32) -> Vec<usize> {
    if names.is_empty() {
        return Vec::new();
    }
    let m = m as u64;
    let walks: Vec<(u64, u64)> = names
        .iter()
        .map(|name| {
            let offset = hash(name.as_bytes(), 0x6d61_676c) % m;
            let skip = hash(name.as_bytes(), 0x6576_2121) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; names.len()];
    let mut entry = vec![usize::MAX; m as usize];
    let mut filled = 0;
    'fill: loop {
        for (i, (offset, skip)) in walks.iter().enumerate() {
            let mut c = (offset + next[i] * skip) % m;
            while entry[c as usize] != usize::MAX {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
            }
            entry[c as usize] = i;
            next[i] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    entry
}

/// A seeded 64-bit FNV-1a with murmur3's finaliser: stable across builds and nodes.
fn hash(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h = (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.244.{}.{}:8080", i / 200, i % 200 + 10)).collect()
    }

    #[test]
    fn sizes_are_primes_of_at_least_a_hundred_per_backend_within_the_bound() {
        assert_eq!(table_size(1, 100, 65521), 127);
        assert_eq!(table_size(10, 100, 65521), 1021);
        assert_eq!(table_size(3, 100, 65521), 509);
        assert_eq!(table_size(1000, 100, 65521), 65521, "bounded, still prime");
        assert_eq!(table_size(1000, 100, 60000), 59999, "bounded below the ladder's step");
        assert_eq!(table_size(0, 100, 65521), 7);
    }

    #[test]
    fn one_backend_more_or_less_keeps_the_size_but_at_the_ladders_steps() {
        let steps: Vec<usize> =
            (1..700).filter(|n| table_size(*n, 100, 65521) != table_size(n - 1, 100, 65521)).collect();
        // 2^k / 100 backends: the sizes double, so a step comes ever more rarely.
        assert_eq!(steps, [1, 2, 3, 6, 11, 21, 41, 82, 164, 328]);
    }

    #[test]
    fn every_backend_gets_its_share_within_one_percent() {
        for n in [3, 10, 57] {
            let m = table_size(n, 100, 65521);
            let t = table(&names(n), m);
            assert_eq!(t.len(), m as usize);
            let mut share = vec![0usize; n];
            t.iter().for_each(|i| share[*i] += 1);
            let even = m as f64 / n as f64;
            for s in share {
                assert!((s as f64 - even).abs() <= even * 0.01 + 1.0, "n={n} m={m}: {s} vs {even}");
            }
        }
    }

    #[test]
    fn removing_one_of_n_backends_moves_about_one_in_n_positions() {
        let n = 10;
        let m = table_size(n, 100, 65521);
        assert_eq!(table_size(n - 1, 100, 65521), m, "the table keeps its size");
        let all = names(n);
        let before = table(&all, m);
        let fewer: Vec<String> = all.iter().filter(|s| **s != all[3]).cloned().collect();
        let after = table(&fewer, table_size(n - 1, 100, 65521));
        let moved = before.iter().zip(&after).filter(|(b, a)| all[**b] != fewer[**a]).count();
        // The removed backend's tenth must move; Maglev moves a little more, never much.
        let share = moved as f64 / m as f64;
        assert!((0.1..=0.13).contains(&share), "{moved} of {m} positions moved");
    }

    #[test]
    fn the_same_set_gives_the_same_table() {
        assert_eq!(table(&names(5), 503), table(&names(5), 503));
    }
}
