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

    #[test]
    fn value_is_log2_one_plus_r() {
        assert_eq!(token_value(0.0), 0.0);
        assert_eq!(token_value(1.0), 1.0);
        assert_eq!(token_value(3.0), 2.0);
        assert_eq!(token_value(0.5), (1.5f64).log2() as f32);
    }
}
