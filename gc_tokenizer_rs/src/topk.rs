//! Gene ordering and top-k selection.
//!
//! Genes are ordered by the ratio `r = x / median` descending, ties broken by token id ascending.
//! Tokens are unique within a cell (duplicates are summed before), so this is a total order and
//! the result never depends on the input order, the sort algorithm or floating-point `log2`.

use std::cmp::Ordering;

/// One candidate gene of a cell: its median ratio and its token id.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ranked {
    pub r: f64,
    pub token: u32,
}

/// The corpus order: `r` descending, then token id ascending.
#[inline]
pub fn rank_order(a: &Ranked, b: &Ranked) -> Ordering {
    b.r.total_cmp(&a.r).then_with(|| a.token.cmp(&b.token))
}

/// Keeps the first `k` entries of `entries` in [`rank_order`], sorted.
///
/// With more than `k` entries this partitions with `select_nth_unstable_by` (O(n)) and sorts only
/// the `k` survivors (O(k log k)) instead of sorting all `n`.
pub fn select_top_k(entries: &mut Vec<Ranked>, k: usize) {
    if k == 0 {
        entries.clear();
        return;
    }
    if entries.len() > k {
        entries.select_nth_unstable_by(k - 1, rank_order);
        entries.truncate(k);
    }
    entries.sort_unstable_by(rank_order);
}

/// Packs `(r, token)` into one `u64` whose ascending order is the corpus order up to ties of the
/// high bits of `r`: the high `64 - token_bits` bits of `r`'s bit pattern (inverted, so larger `r`
/// sorts first; `r >= 0`, whose bits increase with it), then the token id. Keys are sorted as plain
/// integers; [`finish_packed`] then re-sorts exactly the rare groups whose `r` agree in the high
/// bits but differ below them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyLayout {
    token_bits: u32,
}

impl KeyLayout {
    /// The layout for token ids below `vocab_size` (at most 2^32).
    pub fn new(vocab_size: usize) -> Self {
        let token_bits = (usize::BITS - vocab_size.saturating_sub(1).leading_zeros()).clamp(1, 32);
        Self { token_bits }
    }

    /// The key of a candidate with ratio `r >= 0` (not NaN) and token `token`.
    #[inline]
    pub fn key(&self, r: f64, token: u32) -> u64 {
        let prefix_bits = 64 - self.token_bits;
        // r >= 0 has a zero sign bit: its 63 remaining bits, truncated to prefix_bits.
        let prefix = r.to_bits() >> (63 - prefix_bits);
        let descending = !prefix & ((1u64 << prefix_bits) - 1);
        (descending << self.token_bits) | u64::from(token)
    }

    #[inline]
    pub fn token(&self, key: u64) -> u32 {
        (key & ((1u64 << self.token_bits) - 1)) as u32
    }

    #[inline]
    fn prefix(&self, key: u64) -> u64 {
        key >> self.token_bits
    }
}

/// Exact corpus order of two packed keys, given each token's `r`.
#[inline]
fn exact_order(layout: &KeyLayout, r_of: &impl Fn(u32) -> f64, a: u64, b: u64) -> Ordering {
    let (ta, tb) = (layout.token(a), layout.token(b));
    r_of(tb).total_cmp(&r_of(ta)).then_with(|| ta.cmp(&tb))
}

/// [`select_top_k`] on packed keys: keeps the first `k` keys of `keys` in the exact corpus order
/// ([`rank_order`] of `(r_of(token), token)`), sorted. `scratch` is a reusable buffer.
pub fn select_top_k_packed(
    keys: &mut Vec<u64>,
    k: usize,
    layout: &KeyLayout,
    r_of: impl Fn(u32) -> f64,
    scratch: &mut Vec<u64>,
) {
    if k == 0 {
        keys.clear();
        return;
    }
    if keys.len() > k {
        keys.select_nth_unstable(k - 1);
        // Keys past k that share the k-th key's prefix may come before some of the first k in
        // the exact order: settle that prefix group exactly.
        let boundary = layout.prefix(keys[k - 1]);
        if keys[k..].iter().any(|&key| layout.prefix(key) == boundary) {
            let in_head = keys[..k]
                .iter()
                .filter(|&&key| layout.prefix(key) == boundary)
                .count();
            scratch.clear();
            scratch.extend(keys.iter().filter(|&&key| layout.prefix(key) == boundary));
            scratch.sort_unstable_by(|&a, &b| exact_order(layout, &r_of, a, b));
            let mut write = 0;
            for read in 0..k {
                if layout.prefix(keys[read]) != boundary {
                    keys[write] = keys[read];
                    write += 1;
                }
            }
            keys[write..k].copy_from_slice(&scratch[..in_head]);
        }
        keys.truncate(k);
    }
    keys.sort_unstable();
    finish_packed(keys, layout, &r_of);
}

/// Makes integer-sorted keys exactly ordered: every run of equal prefixes whose `r` differ is
/// re-sorted with the exact comparison (runs of true ties are already ordered by token).
pub fn finish_packed(keys: &mut [u64], layout: &KeyLayout, r_of: &impl Fn(u32) -> f64) {
    let mut i = 0;
    while i + 1 < keys.len() {
        let prefix = layout.prefix(keys[i]);
        if layout.prefix(keys[i + 1]) != prefix {
            i += 1;
            continue;
        }
        let mut j = i + 2;
        while j < keys.len() && layout.prefix(keys[j]) == prefix {
            j += 1;
        }
        let group = &mut keys[i..j];
        let r0 = r_of(layout.token(group[0])).to_bits();
        if group[1..]
            .iter()
            .any(|&key| r_of(layout.token(key)).to_bits() != r0)
        {
            group.sort_unstable_by(|&a, &b| exact_order(layout, r_of, a, b));
        }
        i = j;
    }
}

/// The stored value `log2(1 + r)`, computed in f64 and rounded once to f32.
#[inline]
pub fn token_value(r: f64) -> f32 {
    (1.0 + r).log2() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranked(pairs: &[(f64, u32)]) -> Vec<Ranked> {
        pairs
            .iter()
            .map(|&(r, token)| Ranked { r, token })
            .collect()
    }

    fn tokens(v: &[Ranked]) -> Vec<u32> {
        v.iter().map(|e| e.token).collect()
    }

    /// Tiny deterministic PRNG (splitmix64) for the randomised tests.
    fn splitmix(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    #[test]
    fn ties_broken_by_token_id() {
        let mut v = ranked(&[(1.0, 9), (2.0, 5), (1.0, 3), (2.0, 7), (1.0, 4)]);
        select_top_k(&mut v, 10);
        assert_eq!(tokens(&v), vec![5, 7, 3, 4, 9]);
    }

    #[test]
    fn truncation_keeps_best() {
        let mut v = ranked(&[(1.0, 9), (2.0, 5), (1.0, 3), (2.0, 7), (1.0, 4), (0.5, 0)]);
        select_top_k(&mut v, 3);
        assert_eq!(tokens(&v), vec![5, 7, 3]);
        let mut v = ranked(&[(1.0, 1), (3.0, 2)]);
        select_top_k(&mut v, 2);
        assert_eq!(tokens(&v), vec![2, 1]);
    }

    #[test]
    fn k_larger_than_n_and_edge_cases() {
        let mut v = ranked(&[(0.1, 1), (0.3, 2), (0.2, 0)]);
        select_top_k(&mut v, 100);
        assert_eq!(tokens(&v), vec![2, 0, 1]);
        let mut empty: Vec<Ranked> = Vec::new();
        select_top_k(&mut empty, 5);
        assert!(empty.is_empty());
        let mut v = ranked(&[(0.1, 1)]);
        select_top_k(&mut v, 0);
        assert!(v.is_empty());
    }

    #[test]
    fn partial_selection_equals_full_sort() {
        let mut state = 42u64;
        for round in 0..200 {
            let n = (splitmix(&mut state) % 300) as usize;
            let k = 1 + (splitmix(&mut state) % 64) as usize;
            // Few distinct r values so that many ties occur.
            let mut v: Vec<Ranked> = (0..n as u32)
                .map(|token| Ranked {
                    r: (splitmix(&mut state) % 17) as f64 / 4.0,
                    token,
                })
                .collect();
            // Shuffle tokens relative to position.
            for i in (1..v.len()).rev() {
                let j = (splitmix(&mut state) % (i as u64 + 1)) as usize;
                v.swap(i, j);
            }
            let mut full = v.clone();
            full.sort_by(rank_order);
            full.truncate(k);
            select_top_k(&mut v, k);
            assert_eq!(v, full, "round {round} n {n} k {k}");
        }
    }

    /// Packed selection with a given token width, against the comparator version.
    fn check_packed(v: &[Ranked], k: usize, vocab: usize) {
        let layout = KeyLayout::new(vocab);
        let r_of_table: std::collections::HashMap<u32, f64> =
            v.iter().map(|e| (e.token, e.r)).collect();
        let mut keys: Vec<u64> = v.iter().map(|e| layout.key(e.r, e.token)).collect();
        let mut scratch = Vec::new();
        select_top_k_packed(&mut keys, k, &layout, |t| r_of_table[&t], &mut scratch);
        let mut expected = v.to_vec();
        select_top_k(&mut expected, k);
        let got: Vec<u32> = keys.iter().map(|&key| layout.token(key)).collect();
        assert_eq!(got, tokens(&expected), "k {k} vocab {vocab}");
    }

    #[test]
    fn packed_keys_equal_comparator_order() {
        let mut state = 7u64;
        for round in 0..400 {
            let n = (splitmix(&mut state) % 400) as usize;
            let k = 1 + (splitmix(&mut state) % 300) as usize;
            // Values with ties, values differing only in the lowest mantissa bits (same packed
            // prefix, different r), zeros and infinities.
            let base = [
                0.25,
                1.0,
                1.0 + f64::EPSILON,
                1.0 + 4.0 * f64::EPSILON,
                3.5,
                0.0,
            ];
            let mut v: Vec<Ranked> = (0..n as u32)
                .map(|token| {
                    let pick = splitmix(&mut state) % 8;
                    let r = match pick {
                        0..=5 => base[pick as usize],
                        6 => f64::INFINITY,
                        _ => (splitmix(&mut state) % 1000) as f64 / 7.0,
                    };
                    Ranked {
                        r,
                        token: token * 3,
                    }
                })
                .collect();
            for i in (1..v.len()).rev() {
                let j = (splitmix(&mut state) % (i as u64 + 1)) as usize;
                v.swap(i, j);
            }
            let vocab = 3 * n.max(1) + [0, 1000, 1 << 20][round % 3];
            check_packed(&v, k, vocab);
        }
        // A full-width vocabulary (32 token bits: the prefix keeps only 32 bits of r).
        let v: Vec<Ranked> = (0..50u32)
            .map(|i| Ranked {
                r: 1.0 + f64::from(i % 5) * 1e-12,
                token: u32::MAX - 100 + i,
            })
            .collect();
        for k in [1, 7, 10, 49, 50, 60] {
            check_packed(&v, k, 1 << 32);
        }
    }

    #[test]
    fn key_layout() {
        let layout = KeyLayout::new(97_447);
        assert_eq!(layout.token_bits, 17);
        assert_eq!(KeyLayout::new(1).token_bits, 1);
        assert_eq!(KeyLayout::new(1 << 17).token_bits, 17);
        assert_eq!(KeyLayout::new((1 << 17) + 1).token_bits, 18);
        assert!(layout.key(2.0, 5) < layout.key(1.0, 0));
        assert!(layout.key(1.0, 4) < layout.key(1.0, 5));
        assert_eq!(layout.token(layout.key(0.3, 97_446)), 97_446);
        assert!(layout.key(f64::INFINITY, 9) < layout.key(f64::MAX, 0));
        assert!(layout.key(f64::MIN_POSITIVE, 9) < layout.key(0.0, 0));
    }

    #[test]
    fn value_is_log2_one_plus_r() {
        assert_eq!(token_value(0.0), 0.0);
        assert_eq!(token_value(1.0), 1.0);
        assert_eq!(token_value(3.0), 2.0);
        assert_eq!(token_value(0.5), (1.5f64).log2() as f32);
    }
}
