//! Hot/cold neuron placement under a VRAM budget.
//!
//! * [`cost`]: the exact byte cost of every part of a model file (attention, predictors, norms,
//!   output, KV cache, and each FFN neuron's gate + up + down_t rows).
//! * [`solve`]: which FFN neurons go to the GPU: [`solve::solve_optimal`] (the most activations
//!   covered under the exact byte cost) and [`solve::solve_reference`] (the reference's
//!   256-neuron groups).
//! * [`profile`]: per-neuron activation counts from a safetensors profile or from the
//!   reference's `activation/activation_{i}.pt` directory.
//! * [`plan`]: the whole placement: fixed items in the reference's priority order, the FFN
//!   in what is left, written as a `.gpuidx` ([`powerinfer_gguf::GpuIndex`]) with a
//!   [`Summary`].
//!
//! ```no_run
//! use powerinfer_gguf::GgufFile;
//! use powerinfer_planner::{CostModel, Method, PlanOptions, plan, profile};
//!
//! let file = GgufFile::open("llama-7b.q4_0.powerinfer.gguf")?;
//! let cost = CostModel::from_gguf(&file, 2048)?;
//! let counts = profile::read_profile("profile.safetensors")?;
//! let opts = PlanOptions::new(4 << 30, Method::Optimal);
//! let p = plan(&cost, &counts, &opts)?;
//! p.gpu_index.write("llama-7b.q4_0.powerinfer.gguf.generated.gpuidx")?;
//! println!("{:.1}% of activations on the GPU", 100.0 * p.summary.coverage);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod cost;
pub mod profile;
pub mod solve;

use std::path::{Path, PathBuf};

use powerinfer_gguf::{GpuIndex, GpuIndexError, LayerGpuIndex};
use serde::Serialize;

pub use cost::{Category, CostError, CostModel, FfnLayerCost, FixedItem, KvShape};
pub use profile::{ActivationTensor, ActivationValues, ProfileError};
pub use solve::{Method, Selection, SolveError};

/// What is not in the byte counts (also listed in every [`Summary`]).
pub const NOT_COUNTED: &[&str] = &[
    "CUDA context and driver reservations",
    "compute scratch buffers and activations (use the reserve)",
    "token embedding table (stays on the CPU)",
    "allocator alignment padding",
];

/// How to plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanOptions {
    /// The VRAM budget in bytes (written as `split.vram_capacity`).
    pub budget: u64,
    /// Bytes kept free for scratch buffers; the placement uses at most `budget - reserve`.
    pub reserve: u64,
    /// The FFN solver.
    pub method: Method,
    /// When the fixed items do not all fit: `false` gives [`PlanError::BudgetTooSmall`];
    /// `true` places the longest prefix of them (in priority order) that fits, and no FFN.
    pub partial: bool,
}

impl PlanOptions {
    /// A budget and method, no reserve, not partial.
    pub fn new(budget: u64, method: Method) -> Self {
        PlanOptions {
            budget,
            reserve: 0,
            method,
            partial: false,
        }
    }
}

/// Why no plan was made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The counts do not fit the model.
    #[error(transparent)]
    Profile(#[from] ProfileError),
    /// The solver refused its input.
    #[error(transparent)]
    Solve(#[from] SolveError),
    /// The placement file could not be built.
    #[error(transparent)]
    GpuIndex(#[from] GpuIndexError),
    /// The reserve is at least the budget.
    #[error("reserve of {reserve} bytes leaves nothing of the {budget}-byte budget")]
    ReserveTooLarge {
        /// Budget.
        budget: u64,
        /// Reserve.
        reserve: u64,
    },
    /// The fixed items do not all fit (and a partial placement was not asked for).
    #[error(
        "budget too small: the fixed part (attention, predictors, norms, output, KV cache at {n_ctx} tokens) needs {fixed} bytes ({fixed_mib:.1} MiB) but {available} bytes ({available_mib:.1} MiB) are available after the reserve; raise the budget, lower the context size, or place only what fits (partial)"
    )]
    BudgetTooSmall {
        /// Bytes the fixed items need.
        fixed: u64,
        /// `fixed` in MiB.
        fixed_mib: f64,
        /// `budget - reserve`.
        available: u64,
        /// `available` in MiB.
        available_mib: f64,
        /// The context size the KV cache was counted for.
        n_ctx: u64,
    },
}

/// Bytes needed and placed in one category.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CategorySummary {
    /// The category.
    pub category: Category,
    /// Bytes of everything in it.
    pub needed: u64,
    /// Bytes placed on the GPU.
    pub placed: u64,
}

/// One layer of the FFN placement.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerSummary {
    /// Layer.
    pub layer: usize,
    /// Its neurons.
    pub n_ff: usize,
    /// Neurons on the GPU.
    pub n_gpu: usize,
    /// Bytes per neuron.
    pub neuron_bytes: u64,
    /// Activations of its GPU neurons.
    pub covered: u128,
    /// Activations of all its neurons.
    pub total: u128,
}

/// What a plan placed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// The FFN solver used.
    pub method: Method,
    /// Budget in bytes.
    pub budget: u64,
    /// Reserve in bytes.
    pub reserve: u64,
    /// Context size of the KV cache.
    pub n_ctx: u64,
    /// Per category (the fixed ones in priority order, then the FFN).
    pub categories: Vec<CategorySummary>,
    /// Whether every fixed item is placed.
    pub fixed_complete: bool,
    /// Bytes left for the FFN after the reserve and the fixed items.
    pub ffn_budget: u64,
    /// Bytes placed in all.
    pub placed: u64,
    /// `budget - reserve - placed`.
    pub unused: u64,
    /// Bytes that stay on the CPU by design (the token embedding table).
    pub cpu_only: u64,
    /// Per layer.
    pub layers: Vec<LayerSummary>,
    /// Activations of the GPU neurons.
    pub covered: u128,
    /// Activations of all neurons.
    pub total: u128,
    /// `covered / total` (0 when `total` is 0).
    pub coverage: f64,
    /// GPU neurons in all.
    pub gpu_neurons: usize,
    /// Neurons in all.
    pub neurons: usize,
    /// What the byte counts leave out.
    pub not_counted: Vec<String>,
}

/// A placement: the `.gpuidx` content and what it places.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The placement file (`vram_capacity` = the budget).
    pub gpu_index: GpuIndex,
    /// The FFN selection.
    pub selection: Selection,
    /// The summary.
    pub summary: Summary,
}

/// Plans a placement: fixed items in priority order (attention from layer 0 up, predictors,
/// norms, output, other tensors, KV cache), then the FFN neurons chosen by `opts.method` in
/// the bytes left. `counts` must have one `Vec` of length `n_ff` per layer.
pub fn plan(cost: &CostModel, counts: &[Vec<u64>], opts: &PlanOptions) -> Result<Plan, PlanError> {
    profile::check_profile(counts, &cost.n_ff())?;
    if opts.reserve >= opts.budget {
        return Err(PlanError::ReserveTooLarge {
            budget: opts.budget,
            reserve: opts.reserve,
        });
    }
    let available = opts.budget - opts.reserve;
    let fixed_total = cost.fixed_bytes().unwrap_or(u64::MAX);
    const MIB: f64 = (1u64 << 20) as f64;
    if fixed_total > available && !opts.partial {
        return Err(PlanError::BudgetTooSmall {
            fixed: fixed_total,
            fixed_mib: fixed_total as f64 / MIB,
            available,
            available_mib: available as f64 / MIB,
            n_ctx: cost.n_ctx,
        });
    }
    // Longest prefix of the fixed items that fits.
    let mut used = 0u64;
    let mut placed_fixed = 0usize;
    for item in &cost.fixed {
        match used.checked_add(item.bytes) {
            Some(u) if u <= available => {
                used = u;
                placed_fixed += 1;
            }
            _ => break,
        }
    }
    let fixed_complete = placed_fixed == cost.fixed.len();
    let ffn_budget = if fixed_complete { available - used } else { 0 };
    let selection = solve::solve(opts.method, counts, &cost.neuron_bytes(), ffn_budget)?;

    let mut categories: Vec<CategorySummary> = Category::FIXED_ORDER
        .iter()
        .map(|&category| CategorySummary {
            category,
            needed: cost.category_bytes(category),
            placed: 0,
        })
        .collect();
    for item in &cost.fixed[..placed_fixed] {
        if let Some(c) = categories.iter_mut().find(|c| c.category == item.category) {
            c.placed += item.bytes;
        }
    }
    categories.push(CategorySummary {
        category: Category::Ffn,
        needed: cost.ffn_bytes().unwrap_or(u64::MAX),
        placed: selection.bytes,
    });

    let mut layers = Vec::with_capacity(cost.n_layer);
    let mut gpu_layers = Vec::with_capacity(cost.n_layer);
    for (layer, (ids, c)) in selection.layers.iter().zip(counts).enumerate() {
        let mut gpu_idx = vec![0i32; c.len()];
        for &i in ids {
            gpu_idx[i as usize] = 1;
        }
        gpu_layers.push(LayerGpuIndex::from_gpu_idx(gpu_idx));
        layers.push(LayerSummary {
            layer,
            n_ff: c.len(),
            n_gpu: ids.len(),
            neuron_bytes: cost.ffn[layer].neuron_bytes,
            covered: solve::covered(std::slice::from_ref(c), std::slice::from_ref(ids)),
            total: c.iter().map(|&a| u128::from(a)).sum(),
        });
    }
    let gpu_index = GpuIndex {
        vram_capacity: opts.budget,
        layers: gpu_layers,
    };
    gpu_index.validate()?;
    let total: u128 = layers.iter().map(|l| l.total).sum();
    let placed = used + selection.bytes;
    let summary = Summary {
        method: opts.method,
        budget: opts.budget,
        reserve: opts.reserve,
        n_ctx: cost.n_ctx,
        categories,
        fixed_complete,
        ffn_budget,
        placed,
        unused: available - placed,
        cpu_only: cost.cpu_only.iter().map(|(_, b)| b).sum(),
        gpu_neurons: layers.iter().map(|l| l.n_gpu).sum(),
        neurons: layers.iter().map(|l| l.n_ff).sum(),
        layers,
        covered: selection.covered,
        total,
        coverage: if total == 0 {
            0.0
        } else {
            selection.covered as f64 / total as f64
        },
        not_counted: NOT_COUNTED.iter().map(|s| (*s).to_owned()).collect(),
    };
    Ok(Plan {
        gpu_index,
        selection,
        summary,
    })
}

/// The reference's reuse rule: an existing placement made for `existing.vram_capacity` bytes
/// is reused when the current budget is at least that (it still fits); otherwise it is made
/// again.
pub fn can_reuse(existing: &GpuIndex, budget: u64) -> bool {
    budget >= existing.vram_capacity
}

/// Whether an existing placement fits a model's FFN shape (one layer per model layer, each
/// with the model's `n_ff`); a runtime should check this before reusing one.
pub fn matches_model(existing: &GpuIndex, cost: &CostModel) -> bool {
    existing.layers.len() == cost.n_layer
        && existing
            .layers
            .iter()
            .zip(&cost.ffn)
            .all(|(l, f)| l.n_ff() == f.n_ff)
}

/// Loads the placement at `path` if the runtime should reuse it: the file exists, parses, was
/// made for the model's shape and for a budget no larger than `budget`. `Ok(None)`: plan anew.
pub fn reusable(
    path: impl AsRef<Path>,
    cost: &CostModel,
    budget: u64,
) -> Result<Option<GpuIndex>, GpuIndexError> {
    let path = path.as_ref();
    if !path.is_file() {
        return Ok(None);
    }
    let existing = GpuIndex::open(path)?;
    Ok((can_reuse(&existing, budget) && matches_model(&existing, cost)).then_some(existing))
}

/// The reference's default placement path: `<model file name>.generated.gpuidx` in the
/// model's directory.
pub fn default_gpuidx_path(model: impl AsRef<Path>) -> PathBuf {
    let mut s = model.as_ref().as_os_str().to_owned();
    s.push(".generated.gpuidx");
    PathBuf::from(s)
}
