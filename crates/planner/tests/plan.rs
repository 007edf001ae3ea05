//! Whole plans on the fixture model: priority order, budget, `.gpuidx` round trip, profiles.

use powerinfer_gguf::{GgufFile, GpuIndex};
use powerinfer_planner::profile::{
    check_profile, parse_profile, profile_bytes, read_profile, uniform_counts, write_profile,
};
use powerinfer_planner::{
    Category, CostModel, Method, PlanError, PlanOptions, ProfileError, can_reuse,
    default_gpuidx_path, matches_model, plan, reusable,
};
use safetensors::Dtype;
use safetensors::tensor::TensorView;

const FIXTURES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/fixtures/powerinfer-tiny/"
);

fn cost(n_ctx: u64) -> CostModel {
    let f = GgufFile::open(format!(
        "{FIXTURES}tiny-relu-llama.random-pred.q4_0.powerinfer.gguf"
    ))
    .unwrap();
    CostModel::from_gguf(&f, n_ctx).unwrap()
}

/// Layer `l`, neuron `i`: count `(i * 37 + l * 11) % 101`.
fn counts() -> Vec<Vec<u64>> {
    (0..3)
        .map(|l| {
            (0..1024)
                .map(|i| ((i * 37 + l * 11) % 101) as u64)
                .collect()
        })
        .collect()
}

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("powerinfer-planner-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn plan_fills_fixed_part_then_ffn_and_round_trips() {
    let c = cost(256);
    let fixed = c.fixed_bytes().unwrap();
    // Room for exactly 1000 neurons of 108 bytes, plus 50 spare bytes.
    let budget = fixed + 1000 * 108 + 50;
    for method in [Method::Optimal, Method::Reference] {
        let counts = counts();
        let p = plan(&c, &counts, &PlanOptions::new(budget, method)).unwrap();
        let s = &p.summary;
        assert!(s.fixed_complete);
        assert_eq!(s.ffn_budget, 1000 * 108 + 50);
        assert!(s.placed <= budget);
        assert_eq!(s.placed + s.unused, budget);
        for cat in &s.categories {
            if cat.category != Category::Ffn {
                assert_eq!(cat.placed, cat.needed, "{:?}", cat.category);
            }
        }
        let n_gpu: usize = p.gpu_index.layers.iter().map(|l| l.n_gpu()).sum();
        assert_eq!(n_gpu, s.gpu_neurons);
        match method {
            Method::Optimal => assert_eq!(n_gpu, 1000),
            // Whole groups of 256 only.
            Method::Reference => assert_eq!(n_gpu % 256, 0),
        }
        assert_eq!(p.gpu_index.vram_capacity, budget);
        // The GPU neurons are each layer's most activated ones.
        for (l, layer) in p.gpu_index.layers.iter().enumerate() {
            let min_on = layer
                .gpu_bucket
                .iter()
                .map(|&i| counts[l][i as usize])
                .min();
            let max_off = (0..1024)
                .filter(|&i| layer.gpu_idx[i] == 0)
                .map(|i| counts[l][i])
                .max();
            if let (Some(on), Some(off)) = (min_on, max_off) {
                assert!(on >= off, "layer {l}: a colder neuron is on the GPU");
            }
        }
        // Written and read back unchanged.
        let path = tmp(&format!("plan-{method}.gpuidx"));
        p.gpu_index.write(&path).unwrap();
        let back = GpuIndex::open(&path).unwrap();
        assert_eq!(back, p.gpu_index);
        assert!(matches_model(&back, &c));
        // JSON summary serialises.
        let j = serde_json::to_value(s).unwrap();
        assert_eq!(j["method"], method.name());
    }
}

#[test]
fn reserve_and_budget_errors() {
    let c = cost(2048);
    let fixed = c.fixed_bytes().unwrap();
    let counts = counts();
    let e = plan(&c, &counts, &PlanOptions::new(fixed - 1, Method::Optimal)).unwrap_err();
    assert!(matches!(e, PlanError::BudgetTooSmall { .. }), "{e}");
    assert!(e.to_string().contains("budget too small"));
    let mut opts = PlanOptions::new(fixed + 10_000, Method::Optimal);
    opts.reserve = 10_001;
    assert!(matches!(
        plan(&c, &counts, &opts),
        Err(PlanError::BudgetTooSmall { .. })
    ));
    opts.reserve = fixed + 10_000;
    assert!(matches!(
        plan(&c, &counts, &opts),
        Err(PlanError::ReserveTooLarge { .. })
    ));
    // Reserve respected.
    opts.reserve = 5_000;
    let p = plan(&c, &counts, &opts).unwrap();
    assert!(p.summary.placed <= fixed + 5_000);
    assert_eq!(p.summary.gpu_neurons, 5_000 / 108);
}

/// A budget below what attention alone needs (the first fixed item): a clear error naming
/// the fixed part and both sizes; with `partial`, only the attention items that fit (from
/// layer 0 up) and no FFN.
#[test]
fn budget_below_attention_is_a_clear_error() {
    let c = cost(256);
    let attention = c.category_bytes(Category::Attention);
    assert!(attention > 0);
    let e = plan(
        &c,
        &counts(),
        &PlanOptions::new(attention - 1, Method::Optimal),
    )
    .unwrap_err();
    match &e {
        PlanError::BudgetTooSmall {
            fixed,
            available,
            n_ctx,
            ..
        } => {
            assert_eq!(*fixed, c.fixed_bytes().unwrap());
            assert_eq!(*available, attention - 1);
            assert_eq!(*n_ctx, 256);
        }
        _ => panic!("{e}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("budget too small") && msg.contains("attention"),
        "{msg}"
    );
    assert!(msg.contains(&format!("{} bytes", attention - 1)), "{msg}");
    let mut opts = PlanOptions::new(attention - 1, Method::Optimal);
    opts.partial = true;
    let s = plan(&c, &counts(), &opts).unwrap().summary;
    let att = s
        .categories
        .iter()
        .find(|x| x.category == Category::Attention)
        .unwrap();
    assert!(att.placed < attention, "{}", att.placed);
    assert_eq!(s.placed, att.placed);
    assert_eq!(s.gpu_neurons, 0);
    assert!(!s.fixed_complete);
}

#[test]
fn partial_places_a_prefix_in_priority_order() {
    let c = cost(2048);
    let attention = c.category_bytes(Category::Attention);
    let predictors = c.category_bytes(Category::Predictor);
    let mut opts = PlanOptions::new(attention + predictors + 100, Method::Optimal);
    opts.partial = true;
    let p = plan(&c, &counts(), &opts).unwrap();
    let s = &p.summary;
    assert!(!s.fixed_complete);
    let placed = |cat| {
        s.categories
            .iter()
            .find(|c| c.category == cat)
            .unwrap()
            .placed
    };
    assert_eq!(placed(Category::Attention), attention);
    assert_eq!(placed(Category::Predictor), predictors);
    // Norms come next: the first one (256 bytes) does not fit into the 100 left.
    assert_eq!(placed(Category::Norm), 0);
    assert_eq!(placed(Category::KvCache), 0);
    assert_eq!(s.gpu_neurons, 0);
    assert_eq!(s.ffn_budget, 0);
}

#[test]
fn profile_must_match_the_model() {
    let c = cost(16);
    let budget = c.fixed_bytes().unwrap() + (1 << 20);
    let opts = PlanOptions::new(budget, Method::Optimal);
    let mut short = counts();
    short.pop();
    assert!(matches!(
        plan(&c, &short, &opts),
        Err(PlanError::Profile(ProfileError::LayerCount {
            expected: 3,
            found: 2
        }))
    ));
    let mut wrong = counts();
    wrong[1].push(0);
    let e = plan(&c, &wrong, &opts).unwrap_err();
    assert!(matches!(
        e,
        PlanError::Profile(ProfileError::NeuronCount {
            layer: 1,
            expected: 1024,
            found: 1025
        })
    ));
    assert!(check_profile(&uniform_counts(&c.n_ff()), &c.n_ff()).is_ok());
}

#[test]
fn uniform_counts_maximise_neurons() {
    let c = cost(16);
    let budget = c.fixed_bytes().unwrap() + 700 * 108;
    let p = plan(
        &c,
        &uniform_counts(&c.n_ff()),
        &PlanOptions::new(budget, Method::Optimal),
    )
    .unwrap();
    assert_eq!(p.summary.gpu_neurons, 700);
    assert_eq!(p.summary.covered, 700);
    assert_eq!(p.summary.total, 3 * 1024);
}

#[test]
fn reuse_rule() {
    let c = cost(16);
    let budget = c.fixed_bytes().unwrap() + 300 * 108;
    let p = plan(&c, &counts(), &PlanOptions::new(budget, Method::Optimal)).unwrap();
    assert!(can_reuse(&p.gpu_index, budget));
    assert!(can_reuse(&p.gpu_index, budget + 1));
    assert!(!can_reuse(&p.gpu_index, budget - 1));
    let path = tmp("reuse.gpuidx");
    p.gpu_index.write(&path).unwrap();
    assert!(reusable(&path, &c, budget).unwrap().is_some());
    assert!(reusable(&path, &c, budget - 1).unwrap().is_none());
    assert!(
        reusable(tmp("absent.gpuidx"), &c, budget)
            .unwrap()
            .is_none()
    );
    std::fs::write(tmp("junk.gpuidx"), b"not a gguf").unwrap();
    assert!(reusable(tmp("junk.gpuidx"), &c, budget).is_err());
    assert_eq!(
        default_gpuidx_path("/m/llama.powerinfer.gguf"),
        std::path::PathBuf::from("/m/llama.powerinfer.gguf.generated.gpuidx")
    );
}

fn st(tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)>) -> Vec<u8> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, None).unwrap()
}

#[test]
fn profiles_round_trip_and_parse_every_dtype() {
    let counts = counts();
    let path = tmp("profile.safetensors");
    write_profile(&path, &counts).unwrap();
    assert_eq!(read_profile(&path).unwrap(), counts);

    // Layers in numeric order: blk.10 after blk.2.
    let mut many: Vec<Vec<u64>> = (0..12).map(|l| vec![l as u64; 3]).collect();
    many[10][1] = 99;
    assert_eq!(parse_profile(&profile_bytes(&many), "p").unwrap(), many);

    let i64s: Vec<u8> = [5i64, 0, 7].iter().flat_map(|x| x.to_le_bytes()).collect();
    let f32s: Vec<u8> = [1.0f32, 0.0, 16_777_216.0]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let bytes = st(vec![
        ("blk.0.ffn_counts", Dtype::I64, vec![3], i64s),
        ("blk.1.ffn_counts", Dtype::F32, vec![3], f32s),
        ("blk.0.other", Dtype::F32, vec![1], vec![0; 4]),
    ]);
    assert_eq!(
        parse_profile(&bytes, "p").unwrap(),
        vec![vec![5, 0, 7], vec![1, 0, 16_777_216]]
    );
}

#[test]
fn bad_profiles_give_typed_errors() {
    let neg: Vec<u8> = [5i64, -1].iter().flat_map(|x| x.to_le_bytes()).collect();
    let e = parse_profile(
        &st(vec![("blk.0.ffn_counts", Dtype::I64, vec![2], neg)]),
        "p",
    )
    .unwrap_err();
    assert!(matches!(e, ProfileError::BadCount { index: 1, .. }), "{e}");

    for bad in [0.5f32, -1.0, f32::NAN, f32::INFINITY] {
        let b: Vec<u8> = bad.to_le_bytes().to_vec();
        let e = parse_profile(&st(vec![("blk.0.ffn_counts", Dtype::F32, vec![1], b)]), "p")
            .unwrap_err();
        assert!(matches!(e, ProfileError::BadCount { index: 0, .. }), "{e}");
    }

    let e = parse_profile(
        &st(vec![("blk.0.ffn_counts", Dtype::I32, vec![1], vec![0; 4])]),
        "p",
    )
    .unwrap_err();
    assert!(matches!(e, ProfileError::BadTensor { .. }), "{e}");
    let e = parse_profile(
        &st(vec![(
            "blk.0.ffn_counts",
            Dtype::U64,
            vec![1, 1],
            vec![0; 8],
        )]),
        "p",
    )
    .unwrap_err();
    assert!(matches!(e, ProfileError::BadTensor { .. }), "{e}");

    let e = parse_profile(
        &st(vec![
            ("blk.0.ffn_counts", Dtype::U64, vec![1], vec![0; 8]),
            ("blk.2.ffn_counts", Dtype::U64, vec![1], vec![0; 8]),
        ]),
        "p",
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            ProfileError::MissingLayer {
                layer: 1,
                max_layer: 2,
                ..
            }
        ),
        "{e}"
    );
    let e = parse_profile(
        &st(vec![("blk.0.other", Dtype::U64, vec![1], vec![0; 8])]),
        "p",
    )
    .unwrap_err();
    assert!(matches!(e, ProfileError::Empty { .. }), "{e}");
    assert!(matches!(
        parse_profile(b"\xff\xff\xff\xff\xff\xff\xff\xffjunk", "p"),
        Err(ProfileError::Safetensors { .. })
    ));
    assert!(matches!(
        read_profile(tmp("missing.safetensors")),
        Err(ProfileError::Io { .. })
    ));
    assert!(matches!(
        read_profile(std::env::temp_dir()),
        Err(ProfileError::IsDirectory { .. })
    ));
}
