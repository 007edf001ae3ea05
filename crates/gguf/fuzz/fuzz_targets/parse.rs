//! Parses arbitrary bytes as GGUF; whatever parses must be fully usable and must survive a
//! write/read round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use powerinfer_gguf::{GgufFile, GgufWriter, GpuIndex, Value};

fn touch(f: &GgufFile) {
    let _ = (
        f.magic(),
        f.version(),
        f.file_size(),
        f.alignment(),
        f.architecture(),
    );
    for (k, v) in f.metadata() {
        assert!(std::ptr::eq(f.get(k).unwrap(), v));
        let _ = (
            f.get_u32(k),
            f.get_u64(k),
            f.get_i32(k),
            f.get_f32(k),
            f.get_bool(k),
        );
        let _ = (
            f.get_str(k),
            f.get_array(k),
            f.get_str_array(k),
            f.get_strings(k),
            f.get_f32_array(k),
        );
        let _ = f.get_i32_array(k);
        let _ = v.to_string();
    }
    let _ = (
        f.get_arch_u32("block_count"),
        f.get_arch_f32("rope.freq_base"),
    );
    for t in f.tensors() {
        let d = f.tensor_data(t);
        assert_eq!(d.len() as u64, t.size);
        assert_eq!(f.tensor(&t.name).unwrap(), t);
        assert!(t.offset % f.alignment() == 0);
        let _ = (t.n_elements(), t.row_len(), t.n_rows(), t.row_bytes());
    }
    if let Ok(g) = GpuIndex::from_gguf(f) {
        let bytes = g.to_bytes().expect("a parsed gpu index writes");
        assert_eq!(GpuIndex::from_bytes(bytes).expect("and reads back"), g);
    }
}

fn rewrite(f: &GgufFile) -> Vec<u8> {
    let mut w = GgufWriter::new(f.magic());
    w.set_version(f.version()).unwrap();
    for (k, v) in f.metadata() {
        w.add_kv(k.clone(), v.clone())
            .expect("parsed metadata is writable");
    }
    for t in f.tensors() {
        w.add_tensor(t.name.clone(), t.ty, &t.shape, f.tensor_data(t).to_vec())
            .expect("parsed tensor is writable");
    }
    w.write_to_vec().expect("write")
}

fuzz_target!(|data: &[u8]| {
    let Ok(f) = GgufFile::from_bytes(data.to_vec()) else {
        return;
    };
    touch(&f);
    let once = rewrite(&f);
    let g = GgufFile::from_bytes(once.clone()).expect("what the writer writes, the reader reads");
    touch(&g);
    assert_eq!(g.tensors().len(), f.tensors().len());
    for (a, b) in f.tensors().iter().zip(g.tensors()) {
        assert_eq!(
            (&a.name, a.ty, &a.shape, a.size),
            (&b.name, b.ty, &b.shape, b.size)
        );
        assert_eq!(f.tensor_data(a), g.tensor_data(b));
    }
    let same =
        |a: &Value, b: &Value| a.to_string() == b.to_string() && a.type_name() == b.type_name();
    for ((ka, va), (kb, vb)) in f.metadata().iter().zip(g.metadata()) {
        assert_eq!(ka, kb);
        assert!(same(va, vb));
    }
    assert_eq!(rewrite(&g), once, "writing is a fixed point");
});
