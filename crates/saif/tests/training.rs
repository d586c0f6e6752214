//! The trainer on data with a known answer: activations made as sparse sums of a hidden dictionary of directions.
//! A TopK SAE with enough latents must reconstruct them well; the same seed must give the same SAE; a run stopped
//! midway and resumed from its checkpoint must end exactly where an uninterrupted run ends.

mod common;

#[test]
fn a_sparse_dictionary_is_learned_repeatably_and_resumes_exactly() {
    common::learns_repeatably_and_resumes(None);
}
