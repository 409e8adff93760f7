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

/// Sort keys of one cell's candidates: the high bits of `r`'s bit pattern (inverted, so larger
/// `r` sorts first; `r >= 0`, whose bits increase with it), then the candidate's index. Sorting
/// these as plain integers orders the candidates by `r` up to ties of the kept bits; [`rank_top_k`]
/// then settles every run of equal prefixes exactly (`r`, then token id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IndexKeys {
    index_bits: u32,
}

impl IndexKeys {
    /// The layout for `n` candidates (indices below `n`, at most 2^32).
    fn for_count(n: usize) -> Self {
        let index_bits = (usize::BITS - n.saturating_sub(1).leading_zeros()).clamp(1, 32);
        Self { index_bits }
    }

    #[inline]
    fn key(&self, r: f64, index: usize) -> u64 {
        let prefix_bits = 64 - self.index_bits;
        // r >= 0 has a zero sign bit: its 63 remaining bits, truncated to prefix_bits.
        let prefix = r.to_bits() >> (63 - prefix_bits);
        let descending = !prefix & ((1u64 << prefix_bits) - 1);
        (descending << self.index_bits) | index as u64
    }

    #[inline]
    fn index(&self, key: u64) -> usize {
        (key & ((1u64 << self.index_bits) - 1)) as usize
    }

    #[inline]
    fn prefix(&self, key: u64) -> u64 {
        key >> self.index_bits
    }
}

/// Reusable buffers of [`rank_top_k`].
#[derive(Debug, Clone, Default)]
pub struct RankScratch {
    keys: Vec<u64>,
    group: Vec<u64>,
    layout: Option<IndexKeys>,
}

impl RankScratch {
    /// Candidate indices in corpus order, as left by the last [`rank_top_k`].
    pub fn order(&self) -> impl ExactSizeIterator<Item = usize> + '_ {
        let layout = self.layout.unwrap_or(IndexKeys { index_bits: 1 });
        self.keys.iter().map(move |&key| layout.index(key))
    }
}

/// Ranks the candidates `(r[i], token[i])` of one cell (`r >= 0`, not NaN; tokens distinct) in the
/// corpus order ([`rank_order`]: `r` descending, then token id) and keeps the first `k`; read them
/// with [`RankScratch::order`].
///
/// Candidates are sorted as packed integer keys ([`IndexKeys`]); with more than `k` of them, a
/// partial selection (O(n)) comes first and only the `k` survivors are sorted. Runs of keys with
/// equal prefixes (true ties of `r`, or `r` differing only in the dropped low bits) are then
/// re-sorted with the exact comparison, so the result is exactly the comparator's.
pub fn rank_top_k(r: &[f64], token: &[u32], k: usize, scratch: &mut RankScratch) {
    debug_assert_eq!(r.len(), token.len());
    let RankScratch {
        keys,
        group,
        layout,
    } = scratch;
    keys.clear();
    let index_keys = IndexKeys::for_count(r.len());
    *layout = Some(index_keys);
    if k == 0 {
        return;
    }
    keys.extend(r.iter().enumerate().map(|(i, &ri)| index_keys.key(ri, i)));
    let exact = |a: &u64, b: &u64| {
        let (ia, ib) = (index_keys.index(*a), index_keys.index(*b));
        r[ib]
            .total_cmp(&r[ia])
            .then_with(|| token[ia].cmp(&token[ib]))
    };
    if keys.len() > k {
        keys.select_nth_unstable(k - 1);
        // Keys past k that share the k-th key's prefix may come before some of the first k in
        // the exact order: settle that prefix group exactly.
        let boundary = index_keys.prefix(keys[k - 1]);
        if keys[k..]
            .iter()
            .any(|&key| index_keys.prefix(key) == boundary)
        {
            let in_head = keys[..k]
                .iter()
                .filter(|&&key| index_keys.prefix(key) == boundary)
                .count();
            group.clear();
            group.extend(
                keys.iter()
                    .filter(|&&key| index_keys.prefix(key) == boundary),
            );
            group.sort_unstable_by(exact);
            let mut write = 0;
            for read in 0..k {
                if index_keys.prefix(keys[read]) != boundary {
                    keys[write] = keys[read];
                    write += 1;
                }
            }
            keys[write..k].copy_from_slice(&group[..in_head]);
        }
        keys.truncate(k);
    }
    keys.sort_unstable(); // pdqsort: faster here than LSD radix or bucket passes (measured)
                          // Runs of equal prefixes are ordered by candidate index, not by (r, token): sort them exactly.
    let mut i = 0;
    while i + 1 < keys.len() {
        let prefix = index_keys.prefix(keys[i]);
        let mut j = i + 1;
        while j < keys.len() && index_keys.prefix(keys[j]) == prefix {
            j += 1;
        }
        if j - i > 1 {
            keys[i..j].sort_unstable_by(exact);
        }
        i = j;
    }
}

/// The stored value `log2(1 + r)`, computed in f64 and rounded once to f32. (A table-based log2
/// was tried: 2.9 vs 3.4 ns per value against glibc's, not worth leaving bit-exactness for.)
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

    /// [`rank_top_k`] against the comparator version.
    fn check_ranked(v: &[Ranked], k: usize) {
        let r: Vec<f64> = v.iter().map(|e| e.r).collect();
        let token: Vec<u32> = v.iter().map(|e| e.token).collect();
        let mut scratch = RankScratch::default();
        rank_top_k(&r, &token, k, &mut scratch);
        let got: Vec<u32> = scratch.order().map(|i| token[i]).collect();
        let mut expected = v.to_vec();
        select_top_k(&mut expected, k);
        assert_eq!(got, tokens(&expected), "k {k} n {}", v.len());
    }

    #[test]
    fn packed_keys_equal_comparator_order() {
        let mut state = 7u64;
        for _round in 0..400 {
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
            check_ranked(&v, k);
        }
        // Many candidates (wide indices, so the prefix keeps fewer bits of r), near-ties.
        let v: Vec<Ranked> = (0..70_000u32)
            .map(|i| Ranked {
                r: 1.0 + f64::from(i % 5) * 1e-12 + f64::from(i % 13),
                token: u32::MAX - 100_000 + (i * 7919) % 100_000,
            })
            .collect();
        for k in [1, 7, 5_000, 69_999, 70_000, 80_000] {
            check_ranked(&v, k);
        }
    }

    #[test]
    fn index_keys() {
        let layout = IndexKeys::for_count(97_447);
        assert_eq!(layout.index_bits, 17);
        assert_eq!(IndexKeys::for_count(0).index_bits, 1);
        assert_eq!(IndexKeys::for_count(1).index_bits, 1);
        assert_eq!(IndexKeys::for_count(1 << 17).index_bits, 17);
        assert_eq!(IndexKeys::for_count((1 << 17) + 1).index_bits, 18);
        assert!(layout.key(2.0, 5) < layout.key(1.0, 0));
        assert!(layout.key(1.0, 4) < layout.key(1.0, 5));
        assert_eq!(layout.index(layout.key(0.3, 97_446)), 97_446);
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
