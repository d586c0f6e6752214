//! Hooks on the residual stream, the one mechanism that SAEs and steering plug into, on every backend.
//!
//! The hook point is `resid_post[L]`: the hidden state leaving decoder layer L (before the final norm for the last
//! layer). A hook either *reads* it at chosen positions (to encode it with an SAE, to collect statistics), *adds*
//! a vector to it (steering) at all positions, the prompt's only or the generated tokens' only, or *sets its
//! projection* onto a unit direction to a value (`h' = h + (c - h.u) u`, Stolfo et al.'s format steering). At one
//! layer the order is: reads, then adds, then per-position additions, then the projection. Reads therefore see the
//! stream before any change, so an SAE reads the model's own activation; the changes flow into every later layer
//! and into the logits.
//!
//! A backend is handed a `Hooks` on every forward call together with the positions it processes and whether they
//! are prompt or generated tokens; it returns one `Capture` per (read, position).

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// Whether a forward call processes prompt tokens or tokens the model generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Segment {
    Prompt,
    Generated,
}

/// Where a steering vector is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Every position, prompt and generation (SAIF's default).
    #[default]
    All,
    Prompt,
    Generated,
}

impl Scope {
    pub fn covers(self, segment: Segment) -> bool {
        match self {
            Scope::All => true,
            Scope::Prompt => segment == Segment::Prompt,
            Scope::Generated => segment == Segment::Generated,
        }
    }
}

/// Which positions a read hook captures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Positions {
    /// The last position of each forward call (the last prompt token during prefill).
    Last,
    /// Every position of each forward call.
    All,
    /// These absolute positions, where a forward call covers them.
    At(Vec<usize>),
}

/// Read `resid_post[layer]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadHook {
    pub layer: usize,
    pub positions: Positions,
}

/// Add `vector` to `resid_post[layer]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AddHook {
    pub layer: usize,
    pub vector: Vec<f32>,
    pub scope: Scope,
}

/// Add a different vector at each position: `rows` holds one row of `hidden` values per position from `start`
/// (splicing an SAE's reconstruction into the stream, or zeroing a layer, for evaluations).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowsHook {
    pub layer: usize,
    /// Absolute position of the first row.
    pub start: usize,
    pub rows: Vec<f32>,
}

/// Set the component of `resid_post[layer]` along the unit vector `unit` to `value`: `h' = h + (value - h.unit) unit`
/// at every position of the scope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectHook {
    pub layer: usize,
    pub unit: Vec<f32>,
    pub value: f32,
    pub scope: Scope,
}

/// The hooks of one run; empty hooks cost nothing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Hooks {
    pub reads: Vec<ReadHook>,
    pub adds: Vec<AddHook>,
    #[serde(default)]
    pub add_rows: Vec<RowsHook>,
    #[serde(default)]
    pub projections: Vec<ProjectHook>,
}

/// One captured activation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capture {
    pub layer: usize,
    /// Absolute position in the sequence (0 is the first token, BOS where there is one).
    pub position: usize,
    pub values: Vec<f32>,
}

impl Hooks {
    pub fn none() -> Self {
        Self::default()
    }

    pub fn read(mut self, layer: usize, positions: Positions) -> Self {
        self.reads.push(ReadHook { layer, positions });
        self
    }

    pub fn add(mut self, layer: usize, vector: Vec<f32>, scope: Scope) -> Self {
        self.adds.push(AddHook { layer, vector, scope });
        self
    }

    pub fn add_rows(mut self, layer: usize, start: usize, rows: Vec<f32>) -> Self {
        self.add_rows.push(RowsHook { layer, start, rows });
        self
    }

    /// Sets the projection of `resid_post[layer]` onto `unit` (a unit vector) to `value`.
    pub fn project(mut self, layer: usize, unit: Vec<f32>, value: f32, scope: Scope) -> Self {
        self.projections.push(ProjectHook { layer, unit, value, scope });
        self
    }

    pub fn is_empty(&self) -> bool {
        self.reads.is_empty() && self.adds.is_empty() && self.add_rows.is_empty() && self.projections.is_empty()
    }

    /// Checks layers and vector widths against the model, so a bad request fails before any work is done.
    pub fn validate(&self, n_layers: usize, hidden: usize) -> Result<()> {
        for r in &self.reads {
            if r.layer >= n_layers {
                return Err(EngineError::InvalidRequest(format!(
                    "read hook on layer {} but the model has layers 0..{}",
                    r.layer,
                    n_layers - 1
                )));
            }
        }
        for a in &self.adds {
            if a.layer >= n_layers {
                return Err(EngineError::InvalidRequest(format!(
                    "steering vector on layer {} but the model has layers 0..{}",
                    a.layer,
                    n_layers - 1
                )));
            }
            if a.vector.len() != hidden {
                return Err(EngineError::InvalidRequest(format!(
                    "steering vector of width {} but the residual stream is {} wide",
                    a.vector.len(),
                    hidden
                )));
            }
            if a.vector.iter().any(|x| !x.is_finite()) {
                return Err(EngineError::InvalidRequest("steering vector has NaN or infinite entries".into()));
            }
        }
        for (i, p) in self.projections.iter().enumerate() {
            if p.layer >= n_layers || p.unit.len() != hidden {
                return Err(EngineError::InvalidRequest(format!(
                    "projection on layer {} with a direction of width {} (the model has layers 0..{} of width {hidden})",
                    p.layer,
                    p.unit.len(),
                    n_layers - 1
                )));
            }
            if !p.value.is_finite() || p.unit.iter().any(|x| !x.is_finite()) {
                return Err(EngineError::InvalidRequest("projection has NaN or infinite entries".into()));
            }
            let norm = p.unit.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
            if (norm - 1.0).abs() > 1e-3 {
                return Err(EngineError::InvalidRequest(format!(
                    "a projection needs a unit direction (its norm is {norm:.4})"
                )));
            }
            if self.projections[..i].iter().any(|q| q.layer == p.layer) {
                return Err(EngineError::InvalidRequest(format!("two projections on layer {}", p.layer)));
            }
        }
        for r in &self.add_rows {
            if r.layer >= n_layers || r.rows.len() % hidden != 0 {
                return Err(EngineError::InvalidRequest(format!(
                    "per-position additions on layer {} with {} values (rows of {hidden} expected)",
                    r.layer,
                    r.rows.len()
                )));
            }
        }
        Ok(())
    }

    /// Whether any hook touches `layer` (so a backend can skip the layer's hook work entirely).
    pub fn touches(&self, layer: usize) -> bool {
        self.reads.iter().any(|r| r.layer == layer)
            || self.adds.iter().any(|a| a.layer == layer)
            || self.add_rows.iter().any(|a| a.layer == layer)
            || self.projections.iter().any(|p| p.layer == layer)
    }

    /// The projection set at `layer` for this segment, if any (at most one per layer).
    pub fn projection(&self, layer: usize, segment: Segment) -> Option<&ProjectHook> {
        self.projections.iter().find(|p| p.layer == layer && p.scope.covers(segment))
    }

    /// For a forward call over positions `start..start + len`: the per-position additions at `layer` as one
    /// `len x hidden` block (zeros where no hook covers a position), or `None` when there are none.
    pub fn added_rows(&self, layer: usize, start: usize, len: usize, hidden: usize) -> Option<Vec<f32>> {
        let mut block: Option<Vec<f32>> = None;
        for r in self.add_rows.iter().filter(|r| r.layer == layer) {
            let count = r.rows.len() / hidden;
            let (from, to) = (r.start.max(start), (r.start + count).min(start + len));
            if from >= to {
                continue;
            }
            let b = block.get_or_insert_with(|| vec![0.0; len * hidden]);
            for p in from..to {
                let src = &r.rows[(p - r.start) * hidden..(p - r.start + 1) * hidden];
                b[(p - start) * hidden..(p - start + 1) * hidden].iter_mut().zip(src).for_each(|(x, y)| *x += y);
            }
        }
        block
    }

    /// The sum of the vectors added at `layer` for this segment, if any.
    pub fn added_vector(&self, layer: usize, segment: Segment) -> Option<Vec<f32>> {
        let mut sum: Option<Vec<f32>> = None;
        for a in self.adds.iter().filter(|a| a.layer == layer && a.scope.covers(segment)) {
            match &mut sum {
                None => sum = Some(a.vector.clone()),
                Some(s) => s.iter_mut().zip(&a.vector).for_each(|(x, y)| *x += y),
            }
        }
        sum
    }

    /// For a forward call over positions `start..start + len`: the offsets within the call that read hooks on
    /// `layer` capture, sorted and without repeats.
    pub fn read_offsets(&self, layer: usize, start: usize, len: usize) -> Vec<usize> {
        let mut offsets = Vec::new();
        for r in self.reads.iter().filter(|r| r.layer == layer) {
            match &r.positions {
                Positions::Last => offsets.push(len - 1),
                Positions::All => offsets.extend(0..len),
                Positions::At(ps) => {
                    offsets.extend(ps.iter().filter(|&&p| p >= start && p < start + len).map(|p| p - start))
                }
            }
        }
        offsets.sort_unstable();
        offsets.dedup();
        offsets
    }
}

/// `h' = h + (value - h.u) u` for each row of `rows` (rows of `unit.len()` values): the CPU twin of
/// gpu/kernels/project.wgsl.
pub fn set_projection(rows: &mut [f32], unit: &[f32], value: f32) {
    for row in rows.chunks_mut(unit.len()) {
        let along: f32 = row.iter().zip(unit).map(|(h, u)| h * u).sum();
        let shift = value - along;
        row.iter_mut().zip(unit).for_each(|(h, u)| *h += shift * u);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_cover_their_segments() {
        assert!(Scope::All.covers(Segment::Prompt) && Scope::All.covers(Segment::Generated));
        assert!(Scope::Prompt.covers(Segment::Prompt) && !Scope::Prompt.covers(Segment::Generated));
        assert!(!Scope::Generated.covers(Segment::Prompt) && Scope::Generated.covers(Segment::Generated));
    }

    #[test]
    fn adds_on_one_layer_sum_and_respect_scope() {
        let h = Hooks::none().add(2, vec![1.0, 2.0], Scope::All).add(2, vec![10.0, 20.0], Scope::Generated).add(
            3,
            vec![5.0, 5.0],
            Scope::All,
        );
        assert_eq!(h.added_vector(2, Segment::Prompt), Some(vec![1.0, 2.0]));
        assert_eq!(h.added_vector(2, Segment::Generated), Some(vec![11.0, 22.0]));
        assert_eq!(h.added_vector(1, Segment::Prompt), None);
    }

    #[test]
    fn read_offsets_map_absolute_positions_into_the_call() {
        let h = Hooks::none().read(1, Positions::At(vec![3, 7, 12])).read(1, Positions::Last);
        // A call over positions 5..10 holds position 7 (offset 2) and its last offset 4.
        assert_eq!(h.read_offsets(1, 5, 5), vec![2, 4]);
        assert_eq!(h.read_offsets(0, 5, 5), Vec::<usize>::new());
        assert_eq!(Hooks::none().read(0, Positions::All).read_offsets(0, 0, 3), vec![0, 1, 2]);
    }

    #[test]
    fn rows_map_onto_the_positions_of_a_call() {
        // Rows for positions 3, 4, 5 (width 2); a call over positions 4..7.
        let h = Hooks::none().add_rows(1, 3, vec![1.0, 1.0, 2.0, 2.0, 3.0, 3.0]);
        assert_eq!(h.added_rows(1, 4, 3, 2), Some(vec![2.0, 2.0, 3.0, 3.0, 0.0, 0.0]));
        assert_eq!(h.added_rows(1, 6, 2, 2), None);
        assert_eq!(h.added_rows(0, 4, 3, 2), None);
        assert!(h.validate(2, 2).is_ok() && h.validate(2, 4).is_err());
    }

    #[test]
    fn projections_need_unit_directions_one_per_layer() {
        let unit = vec![0.6, 0.8];
        assert!(Hooks::none().project(1, unit.clone(), 3.0, Scope::All).validate(4, 2).is_ok());
        assert!(Hooks::none().project(1, vec![1.0, 1.0], 3.0, Scope::All).validate(4, 2).is_err());
        assert!(Hooks::none().project(1, unit.clone(), f32::INFINITY, Scope::All).validate(4, 2).is_err());
        let twice = Hooks::none().project(1, unit.clone(), 1.0, Scope::All).project(1, unit.clone(), 2.0, Scope::All);
        assert!(twice.validate(4, 2).is_err());
        let h = Hooks::none().project(1, unit, 3.0, Scope::Generated);
        assert!(h.touches(1) && !h.touches(0));
        assert!(h.projection(1, Segment::Prompt).is_none() && h.projection(1, Segment::Generated).is_some());
    }

    #[test]
    fn validation_rejects_wrong_layers_and_widths() {
        assert!(Hooks::none().read(4, Positions::Last).validate(4, 2).is_err());
        assert!(Hooks::none().add(0, vec![1.0], Scope::All).validate(4, 2).is_err());
        assert!(Hooks::none().add(0, vec![f32::NAN, 0.0], Scope::All).validate(4, 2).is_err());
        assert!(Hooks::none().add(3, vec![1.0, 0.0], Scope::All).read(3, Positions::All).validate(4, 2).is_ok());
    }
}
