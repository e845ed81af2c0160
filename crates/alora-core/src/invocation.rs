//! Activation start of an aLoRA request: the first token of the *last* occurrence of the
//! adapter's invocation tokens (PEFT's `calculate_alora_offsets`). Linear time (KMP run
//! over the reversed sequences, so the first match found is the last occurrence).

/// Index of the first token of the last occurrence of `needle` in `haystack`, or `None`
/// when it does not occur (the request then runs as the base model). An empty needle
/// never matches; the adapter registry rejects empty invocation sequences anyway.
pub fn activation_start(haystack: &[u32], needle: &[u32]) -> Option<usize> {
    let m = needle.len();
    if m == 0 || m > haystack.len() {
        return None;
    }
    // Failure function of the reversed needle.
    let rev = |i: usize| needle[m - 1 - i];
    let mut fail = vec![0usize; m];
    let mut k = 0;
    for i in 1..m {
        while k > 0 && rev(i) != rev(k) {
            k = fail[k - 1];
        }
        if rev(i) == rev(k) {
            k += 1;
        }
        fail[i] = k;
    }
    // Scan the haystack from its end; a full match ending (in reverse) at position j
    // is an occurrence starting at j in forward order.
    let mut q = 0;
    for j in (0..haystack.len()).rev() {
        let c = haystack[j];
        while q > 0 && c != rev(q) {
            q = fail[q - 1];
        }
        if c == rev(q) {
            q += 1;
        }
        if q == m {
            return Some(j);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive(h: &[u32], n: &[u32]) -> Option<usize> {
        if n.is_empty() || n.len() > h.len() {
            return None;
        }
        (0..=h.len() - n.len())
            .rev()
            .find(|&j| &h[j..j + n.len()] == n)
    }

    #[test]
    fn finds_last_occurrence() {
        assert_eq!(activation_start(&[1, 2, 3, 1, 2, 3], &[1, 2]), Some(3));
        assert_eq!(activation_start(&[1, 2, 3], &[4]), None);
        assert_eq!(activation_start(&[1, 1, 1, 1], &[1, 1]), Some(2));
        assert_eq!(activation_start(&[5], &[5]), Some(0));
        assert_eq!(activation_start(&[5], &[]), None);
        assert_eq!(activation_start(&[], &[1]), None);
        assert_eq!(activation_start(&[1, 2], &[1, 2, 3]), None);
    }

    proptest! {
        #[test]
        fn agrees_with_naive(h in prop::collection::vec(0u32..3, 0..64),
                             n in prop::collection::vec(0u32..3, 0..6)) {
            prop_assert_eq!(activation_start(&h, &n), naive(&h, &n));
        }
    }
}
