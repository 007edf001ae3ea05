//! The profile file format: round trip, counts-only loading, model identity, malformed files.

use std::path::PathBuf;

use half::bf16;
use powerinfer_gguf::GgufFile;
use powerinfer_predictor::profile::{
    ActivityRule, LayerProfile, ModelIdentity, Profile, ProfileError, mask_bytes,
};

struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn random_profile(n_layer: usize, n_embd: usize, n_ff: usize, seed: u64) -> Profile {
    let mut rng = Rng(seed);
    let layers = (0..n_layer)
        .map(|i| {
            let s = 3 + i; // different sample counts per layer
            LayerProfile {
                counts: (0..n_ff).map(|_| (rng.next_u64() % 1000) as i64).collect(),
                threshold: (rng.next_u64() % 100) as f32 / 37.0,
                // Some inputs beyond f16's range (Gemma 3's residual stream reaches them).
                x: (0..s * n_embd)
                    .map(|k| {
                        let v = (rng.next_u64() % 2001) as f32 / 100.0 - 10.0;
                        bf16::from_f32(if k % 7 == 0 { v * 1e4 } else { v })
                    })
                    .collect(),
                active: (0..s * mask_bytes(n_ff))
                    .map(|_| rng.next_u64() as u8)
                    .collect(),
            }
        })
        .collect();
    Profile {
        identity: ModelIdentity {
            architecture: "llama".into(),
            name: "random test model".into(),
            n_layer,
            n_embd,
            n_ff,
            fingerprint: format!("{:016x}", seed),
        },
        n_tokens: 12345,
        sparsity_target: 0.5,
        rule: ActivityRule::Magnitude,
        ffn_activation: "silu".into(),
        layers,
    }
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "powerinfer-predictor-{}-{name}",
        std::process::id()
    ))
}

#[test]
fn round_trip() {
    // n_ff not a multiple of 8: the mask's last byte is partial
    let p = random_profile(3, 10, 21, 5);
    let path = tmp("round_trip.safetensors");
    p.save(&path).unwrap();
    let q = Profile::load(&path).unwrap();
    assert_eq!(p, q);
    let c = Profile::load_counts(&path).unwrap();
    assert_eq!(c.identity, p.identity);
    for (a, b) in c.layers.iter().zip(&p.layers) {
        assert_eq!(a.counts, b.counts);
        assert_eq!(a.threshold, b.threshold);
        assert!(a.x.is_empty() && a.active.is_empty());
    }
    assert_eq!(q.layers[1].n_samples(10), 4);
    // bit order: neuron j in byte j/8, bit j%8
    let l = &q.layers[2];
    for s in 0..l.n_samples(10) {
        for j in 0..21 {
            let byte = l.active[s * 3 + j / 8];
            assert_eq!(l.is_active(21, s, j), byte & (1 << (j % 8)) != 0);
        }
    }
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn identity_of_fixture_models() {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/powerinfer-tiny");
    let dense = dir.join("tiny-relu-llama.dense.f16.gguf");
    let q4 = dir.join("tiny-relu-llama.random-pred.q4_0.powerinfer.gguf");
    let f16p = dir.join("tiny-relu-llama.random-pred.f16.powerinfer.gguf");
    if !dense.exists() {
        eprintln!("fixtures not found; skipping");
        return;
    }
    let a = ModelIdentity::from_gguf(&GgufFile::open(&dense).unwrap()).unwrap();
    let b = ModelIdentity::from_gguf(&GgufFile::open(&q4).unwrap()).unwrap();
    let c = ModelIdentity::from_gguf(&GgufFile::open(&f16p).unwrap()).unwrap();
    assert_eq!((a.n_layer, a.n_embd, a.n_ff), (3, 64, 1024));
    assert_eq!(a.architecture, "llama");
    assert_eq!(
        a,
        ModelIdentity::from_gguf(&GgufFile::open(&dense).unwrap()).unwrap()
    );
    a.check(&a).unwrap();
    // the same weights in F16 inside a PWRI file keep the identity; Q4_0 weights do not
    a.check(&c).unwrap();
    match a.check(&b) {
        Err(ProfileError::ModelMismatch { field, .. }) => assert_eq!(field, "fingerprint"),
        other => panic!("{other:?}"),
    }
    let mut other = a.clone();
    other.n_ff = 2048;
    match a.check(&other) {
        Err(ProfileError::ModelMismatch {
            field,
            profile,
            model,
        }) => {
            assert_eq!(
                (field, profile.as_str(), model.as_str()),
                ("n_ff", "1024", "2048")
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn malformed_files() {
    assert!(matches!(
        Profile::from_bytes(b"not a safetensors file"),
        Err(ProfileError::Safetensors(_))
    ));
    assert!(matches!(
        Profile::load("/nonexistent/dir/profile.safetensors"),
        Err(ProfileError::Io { .. })
    ));
    let p = random_profile(2, 4, 9, 1);
    let bytes = p.to_bytes().unwrap();
    // truncated
    assert!(Profile::from_bytes(&bytes[..bytes.len() - 3]).is_err());
    // a safetensors file without our metadata
    let plain = safetensors::tensor::serialize(
        [(
            "t",
            safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![1], &[0u8]).unwrap(),
        )],
        None,
    )
    .unwrap();
    assert!(matches!(
        Profile::from_bytes(&plain),
        Err(ProfileError::MissingKey("format"))
    ));
    // inconsistent in-memory profiles are refused before writing
    let mut bad = p.clone();
    bad.layers[1].counts.pop();
    assert!(matches!(bad.to_bytes(), Err(ProfileError::Invalid(_))));
    let mut bad = p.clone();
    bad.layers[0].active.push(0);
    assert!(matches!(bad.to_bytes(), Err(ProfileError::Invalid(_))));
    let mut bad = p.clone();
    bad.layers.pop();
    assert!(matches!(bad.to_bytes(), Err(ProfileError::Invalid(_))));
    // a profile whose header claims more layers than it holds
    let mut more = p.clone();
    more.identity.n_layer = 2;
    let mut bytes = more.to_bytes().unwrap();
    let pat = b"\"n_layer\":\"2\"";
    let at = bytes
        .windows(pat.len())
        .position(|w| w == pat)
        .expect("n_layer in the header");
    bytes[at + pat.len() - 2] = b'3';
    match Profile::from_bytes(&bytes) {
        Err(ProfileError::BadTensor { name, .. }) => assert_eq!(name, "blk.2.ffn_counts"),
        other => panic!("{other:?}"),
    }
}
