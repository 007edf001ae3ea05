//! The CUDA C++ kernel sources, one family per file under `kernels/`, and the names of the
//! kernels each family defines. Pure data: usable without the `cuda` feature.

use powerinfer_gguf::GgmlType;

const COMMON: &str = include_str!("../kernels/common.cuh");
const QUANT: &str = include_str!("../kernels/quant.cuh");

/// One kernel family: a `.cu` file, compiled as one NVRTC program.
#[derive(Debug, Clone, Copy)]
pub struct KernelFamily {
    /// Family name (the file stem).
    pub name: &'static str,
    /// The family's own source (without the shared headers).
    pub body: &'static str,
    /// Whether it needs the weight-format helpers of `quant.cuh`.
    pub needs_quant: bool,
}

impl KernelFamily {
    /// The complete program NVRTC compiles: `common.cuh`, then `quant.cuh` if needed, then the
    /// family's source.
    pub fn source(&self) -> String {
        let mut s = String::with_capacity(COMMON.len() + QUANT.len() + self.body.len() + 64);
        s.push_str(COMMON);
        s.push('\n');
        if self.needs_quant {
            s.push_str(QUANT);
            s.push('\n');
        }
        s.push_str(self.body);
        s
    }

    /// The `extern "C"` kernels this family defines.
    pub fn kernels(&self) -> Vec<String> {
        let per_type = |prefix: &str| -> Vec<String> {
            GPU_TYPES
                .iter()
                .map(|&t| format!("{prefix}_{}", type_suffix(t).unwrap_or("?")))
                .collect()
        };
        match self.name {
            "matvec" => per_type("matvec"),
            "sparse" => {
                let mut v = per_type("sparse_matvec");
                v.extend(per_type("sparse_axpy_partial"));
                v.push("sparse_axpy_reduce".into());
                v
            }
            "norm" => vec!["rms_norm".into()],
            "rope" => vec!["rope".into()],
            "act" => vec!["glu".into()],
            "attention" => vec!["attn_decode".into(), "store_f16".into()],
            _ => Vec::new(),
        }
    }
}

/// Every kernel family.
pub const FAMILIES: &[KernelFamily] = &[
    KernelFamily {
        name: "matvec",
        body: include_str!("../kernels/matvec.cu"),
        needs_quant: true,
    },
    KernelFamily {
        name: "sparse",
        body: include_str!("../kernels/sparse.cu"),
        needs_quant: true,
    },
    KernelFamily {
        name: "norm",
        body: include_str!("../kernels/norm.cu"),
        needs_quant: false,
    },
    KernelFamily {
        name: "rope",
        body: include_str!("../kernels/rope.cu"),
        needs_quant: false,
    },
    KernelFamily {
        name: "act",
        body: include_str!("../kernels/act.cu"),
        needs_quant: false,
    },
    KernelFamily {
        name: "attention",
        body: include_str!("../kernels/attention.cu"),
        needs_quant: false,
    },
];

/// Weight types the matvec and sparse kernels read.
pub const GPU_TYPES: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q4_0,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q6_K,
];

/// The kernel-name suffix of a weight type (`matvec_q4_k`, ...), `None` if it has no kernel.
pub fn type_suffix(ty: GgmlType) -> Option<&'static str> {
    Some(match ty {
        GgmlType::F32 => "f32",
        GgmlType::F16 => "f16",
        GgmlType::Q4_0 => "q4_0",
        GgmlType::Q8_0 => "q8_0",
        GgmlType::Q4_K => "q4_k",
        GgmlType::Q6_K => "q6_k",
        _ => return None,
    })
}

/// The NVRTC target name (`sm_90`, ...) of compute capability `major.minor`.
pub fn arch_name(major: i32, minor: i32) -> &'static str {
    match (major, minor) {
        (7, 5) => "sm_75",
        (8, 0) => "sm_80",
        (8, 6) => "sm_86",
        (8, 7) => "sm_87",
        (8, 9) => "sm_89",
        (9, 0) => "sm_90",
        (10, 0) => "sm_100",
        (10, 3) => "sm_103",
        (11, 0) => "sm_110",
        (12, 0) => "sm_120",
        (12, 1) => "sm_121",
        // cudarc wants a `&'static str`; an unknown device leaks one short string, once per
        // `Gpu`.
        _ => Box::leak(format!("sm_{major}{minor}").into_boxed_str()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_declared_kernel_is_in_its_source() {
        for f in FAMILIES {
            let src = f.source();
            let names = f.kernels();
            assert!(!names.is_empty(), "{}", f.name);
            for k in names {
                let direct = src.contains(&format!("void {k}("));
                // Per-type kernels come from a macro: `matvec_##T` with T in PI_FOR_EACH_TYPE.
                let via_macro = k.rsplit_once('_').is_some_and(|_| {
                    GPU_TYPES.iter().any(|&t| {
                        let suf = type_suffix(t).unwrap();
                        k.ends_with(suf) && {
                            let prefix = &k[..k.len() - suf.len() - 1];
                            src.contains(&format!("void {prefix}_##T("))
                                && src.contains(&format!("M({suf})"))
                        }
                    })
                });
                assert!(
                    direct || via_macro,
                    "kernel {k} not defined in family {}",
                    f.name
                );
            }
        }
    }

    #[test]
    fn arch_names() {
        assert_eq!(arch_name(9, 0), "sm_90");
        assert_eq!(arch_name(8, 0), "sm_80");
        assert_eq!(arch_name(13, 2), "sm_132");
        for &t in GPU_TYPES {
            assert!(type_suffix(t).is_some());
        }
        assert_eq!(type_suffix(GgmlType::Q5_K), None);
    }
}
