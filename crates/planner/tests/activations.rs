//! The reference's `activation/activation_{i}.pt` directories: listing, numeric layer order,
//! gaps, stray entries, shapes, counts and the model check. The `.pt` reading itself is the
//! caller's (`powerinfer_convert::pt`, tested there and end to end in the CLI's tests); here
//! each file holds its values as text and the loader parses them.

use std::path::{Path, PathBuf};

use powerinfer_planner::profile::{
    activation_counts, activation_file_name, activation_files, read_activation_dir,
};
use powerinfer_planner::{ActivationTensor, ActivationValues, ProfileError};

fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("planner-act-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes layer files holding `values` as text: `i:1 2 3`, `f:1.0 2.5`, optionally with a
/// shape `s:2x3;` in front.
fn write_layer(dir: &Path, layer: usize, text: &str) {
    std::fs::write(dir.join(activation_file_name(layer)), text).unwrap();
}

fn ints(v: &[i64]) -> String {
    let s: Vec<String> = v.iter().map(i64::to_string).collect();
    format!("i:{}", s.join(" "))
}

/// Parses what [`write_layer`] wrote.
fn text_loader(_layer: usize, path: &Path) -> Result<ActivationTensor, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let (shape, rest) = match text.strip_prefix("s:") {
        Some(r) => {
            let (s, rest) = r.split_once(';').ok_or("bad shape")?;
            let shape = s
                .split('x')
                .filter(|d| !d.is_empty())
                .map(|d| d.parse().unwrap())
                .collect();
            (Some(shape), rest.to_owned())
        }
        None => (None, text.clone()),
    };
    let values = if let Some(r) = rest.strip_prefix("i:") {
        ActivationValues::Int(r.split_whitespace().map(|x| x.parse().unwrap()).collect())
    } else if let Some(r) = rest.strip_prefix("f:") {
        ActivationValues::Float(r.split_whitespace().map(|x| x.parse().unwrap()).collect())
    } else {
        return Err(format!("not an activation tensor: {rest:?}"));
    };
    Ok(ActivationTensor {
        shape: shape.unwrap_or_else(|| vec![values.len()]),
        values,
    })
}

fn read(dir: &Path, n_ff: Option<&[usize]>) -> Result<Vec<Vec<u64>>, ProfileError> {
    read_activation_dir(dir, n_ff, &mut text_loader)
}

#[test]
fn layers_come_in_numeric_order() {
    let dir = scratch("order");
    // 12 layers: text order would be 0, 1, 10, 11, 2, ...
    for l in 0..12 {
        write_layer(&dir, l, &ints(&[l as i64, 100 + l as i64, 7]));
    }
    let files = activation_files(&dir).unwrap();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let want: Vec<String> = (0..12).map(activation_file_name).collect();
    assert_eq!(names, want);
    let mut seen = Vec::new();
    let counts = read_activation_dir(&dir, Some(&[3; 12]), &mut |l, p| {
        seen.push((l, p.to_owned()));
        text_loader(l, p)
    })
    .unwrap();
    assert_eq!(seen.len(), 12);
    for (i, (l, p)) in seen.iter().enumerate() {
        assert_eq!((*l, p), (i, &files[i]));
    }
    for (l, c) in counts.iter().enumerate() {
        assert_eq!(c, &vec![l as u64, 100 + l as u64, 7]);
    }
    // Hidden entries are skipped.
    std::fs::write(dir.join(".DS_Store"), "x").unwrap();
    std::fs::create_dir_all(dir.join(".cache")).unwrap();
    assert_eq!(read(&dir, None).unwrap(), counts);
}

#[test]
fn float_and_int_counts() {
    let dir = scratch("dtypes");
    write_layer(&dir, 0, "f:0 1 16777217 3.0e9 -0");
    write_layer(&dir, 1, &ints(&[0, 5, i64::MAX, 1, 2]));
    let c = read(&dir, Some(&[5, 5])).unwrap();
    assert_eq!(c[0], vec![0, 1, 16_777_217, 3_000_000_000, 0]);
    assert_eq!(c[1], vec![0, 5, i64::MAX as u64, 1, 2]);
    // No values, no counts.
    assert_eq!(
        activation_counts("x", &ActivationValues::Int(vec![])).unwrap(),
        Vec::<u64>::new()
    );
}

#[test]
fn a_gap_is_a_missing_layer() {
    let dir = scratch("gap");
    for l in [0, 1, 3] {
        write_layer(&dir, l, &ints(&[1, 2]));
    }
    let e = read(&dir, None).unwrap_err();
    assert!(
        matches!(
            e,
            ProfileError::MissingActivationLayer {
                layer: 2,
                max_layer: 3,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("activation_2.pt is missing"), "{e}");
    // Layer 0 missing.
    std::fs::remove_file(dir.join("activation_0.pt")).unwrap();
    let e = read(&dir, None).unwrap_err();
    assert!(
        matches!(e, ProfileError::MissingActivationLayer { layer: 0, .. }),
        "{e}"
    );
}

#[test]
fn stray_entries_are_named() {
    for (stray, is_dir) in [
        ("README.md", false),
        ("activation_01.pt", false),
        ("activation_2.pt.bak", false),
        ("model_0.pt", false),
        ("activation_1.safetensors", false),
        ("activation_5.pt", true),
    ] {
        let dir = scratch("stray");
        for l in 0..3 {
            write_layer(&dir, l, &ints(&[1, 2]));
        }
        if is_dir {
            std::fs::create_dir_all(dir.join(stray)).unwrap();
        } else {
            std::fs::write(dir.join(stray), "x").unwrap();
        }
        let e = read(&dir, None).unwrap_err();
        match &e {
            ProfileError::StrayFile { name, .. } => assert_eq!(name, stray),
            _ => panic!("{stray}: {e}"),
        }
        assert!(e.to_string().contains(stray), "{e}");
    }
}

#[test]
fn empty_or_missing_directories() {
    let dir = scratch("empty");
    let e = read(&dir, None).unwrap_err();
    assert!(matches!(e, ProfileError::NoActivationFiles { .. }), "{e}");
    let e = read(&dir.join("nope"), None).unwrap_err();
    assert!(matches!(e, ProfileError::Io { .. }), "{e}");
    // A file is not a directory.
    write_layer(&dir, 0, "i:1");
    let e = read(&dir.join("activation_0.pt"), None).unwrap_err();
    assert!(matches!(e, ProfileError::Io { .. }), "{e}");
}

#[test]
fn another_models_activations_are_refused() {
    let dir = scratch("model");
    for l in 0..3 {
        write_layer(&dir, l, &ints(&[1, 2, 3, 4]));
    }
    assert!(read(&dir, Some(&[4, 4, 4])).is_ok());
    // Layer count: checked before any file is read.
    let mut calls = 0;
    let e = read_activation_dir(&dir, Some(&[4; 4]), &mut |l, p| {
        calls += 1;
        text_loader(l, p)
    })
    .unwrap_err();
    assert_eq!(calls, 0);
    assert!(
        matches!(
            e,
            ProfileError::ActivationLayerCount {
                expected: 4,
                found: 3,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("another model"), "{e}");
    let e = read(&dir, Some(&[4, 4])).unwrap_err();
    assert!(
        matches!(
            e,
            ProfileError::ActivationLayerCount {
                expected: 2,
                found: 3,
                ..
            }
        ),
        "{e}"
    );
    // Length: layer 1 has 5 neurons in the model.
    let e = read(&dir, Some(&[4, 5, 4])).unwrap_err();
    match &e {
        ProfileError::ActivationLength {
            path,
            layer: 1,
            expected: 5,
            found: 4,
        } => assert!(path.ends_with("activation_1.pt"), "{path}"),
        _ => panic!("{e}"),
    }
    assert!(e.to_string().contains("n_ff = 5"), "{e}");
}

#[test]
fn bad_counts_name_file_and_position() {
    for (text, index, value) in [
        ("i:1 2 -3", 2, "-3"),
        ("f:1 NaN 2", 1, "NaN"),
        ("f:inf", 0, "inf"),
        ("f:0 -1", 1, "-1"),
        ("f:0.5", 0, "0.5"),
        ("f:1 2 3 1e20 4", 3, "100000000000000000000"),
    ] {
        let dir = scratch("counts");
        write_layer(&dir, 0, "i:0");
        write_layer(&dir, 1, text);
        let e = read(&dir, None).unwrap_err();
        match &e {
            ProfileError::BadCount {
                path,
                index: i,
                value: v,
                ..
            } => {
                assert!(path.ends_with("activation_1.pt"), "{path}");
                assert_eq!((*i, v.as_str()), (index, value), "{text}");
            }
            _ => panic!("{text}: {e}"),
        }
        assert!(e.to_string().contains("not a count"), "{e}");
    }
}

#[test]
fn shapes_and_reader_errors() {
    let dir = scratch("shape");
    write_layer(&dir, 0, "s:2x2;i:1 2 3 4");
    let e = read(&dir, None).unwrap_err();
    assert!(
        matches!(&e, ProfileError::ActivationShape { shape, .. } if shape == &[2, 2]),
        "{e}"
    );
    // A scalar, and a shape that disagrees with the values.
    write_layer(&dir, 0, "s:;i:");
    assert!(matches!(
        read(&dir, None),
        Err(ProfileError::ActivationShape { .. })
    ));
    write_layer(&dir, 0, "s:5;i:1 2 3 4");
    assert!(matches!(
        read(&dir, None),
        Err(ProfileError::ActivationShape { .. })
    ));
    // The reader's own error, with the file named.
    write_layer(&dir, 0, "garbage");
    let e = read(&dir, None).unwrap_err();
    match &e {
        ProfileError::ActivationRead { path, message } => {
            assert!(path.ends_with("activation_0.pt"), "{path}");
            assert!(message.contains("garbage"), "{message}");
        }
        _ => panic!("{e}"),
    }
}
