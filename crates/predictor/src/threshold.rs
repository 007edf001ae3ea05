//! Which sparsity threshold applies: command line, environment, model file, or the default.

use std::ffi::OsStr;

/// The environment variable the reference PowerInfer reads the threshold from.
pub const THRESHOLD_ENV: &str = "LLAMA_SPARSE_PRED_THRESHOLD";

/// Where a threshold came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThresholdSource {
    /// A command-line option.
    Cli,
    /// The environment variable [`THRESHOLD_ENV`].
    Env,
    /// The model file's `powerinfer.sparse_threshold`.
    File,
    /// None of them: `0.0`.
    Default,
}

impl std::fmt::Display for ThresholdSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ThresholdSource::Cli => "the command line",
            ThresholdSource::Env => "environment variable LLAMA_SPARSE_PRED_THRESHOLD",
            ThresholdSource::File => "the model file (powerinfer.sparse_threshold)",
            ThresholdSource::Default => "the default",
        })
    }
}

/// A resolved threshold and its origin.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Threshold {
    /// The value (never NaN; may be infinite: `-inf` computes every neuron).
    pub value: f32,
    /// Where it came from.
    pub source: ThresholdSource,
}

/// A threshold that is not a number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ThresholdError {
    /// The value from `source` is NaN or does not parse as a number.
    #[error("sparse threshold from {origin} is not a number: {text:?}")]
    NotANumber {
        /// Where the value came from.
        origin: ThresholdSource,
        /// The value as given.
        text: String,
    },
}

fn checked(value: f32, source: ThresholdSource) -> Result<Threshold, ThresholdError> {
    if value.is_nan() {
        return Err(ThresholdError::NotANumber {
            origin: source,
            text: value.to_string(),
        });
    }
    Ok(Threshold { value, source })
}

/// Resolves the threshold with precedence command line > environment > file > `0.0`.
///
/// `env` is the raw value of [`THRESHOLD_ENV`] (pass `std::env::var_os(THRESHOLD_ENV)`, or use
/// [`resolve_threshold_from_env`]); an empty or all-blank value counts as unset. Only the value
/// that wins is checked: a NaN, or an environment value that is not valid UTF-8 or does not parse
/// as an `f32` (`"abc"`, `"nan"`), is a [`ThresholdError`] naming its source. Infinities are
/// accepted.
///
/// ```
/// use powerinfer_predictor::{ThresholdSource, resolve_threshold};
/// use std::ffi::OsStr;
/// let t = resolve_threshold(Some(0.1), None, Some(OsStr::new("0.5"))).unwrap();
/// assert_eq!((t.value, t.source), (0.5, ThresholdSource::Env));
/// assert!(resolve_threshold(None, None, Some(OsStr::new("abc"))).is_err());
/// ```
pub fn resolve_threshold(
    file_value: Option<f32>,
    cli: Option<f32>,
    env: Option<&OsStr>,
) -> Result<Threshold, ThresholdError> {
    if let Some(v) = cli {
        return checked(v, ThresholdSource::Cli);
    }
    if let Some(raw) = env {
        let text = raw.to_str().ok_or_else(|| ThresholdError::NotANumber {
            origin: ThresholdSource::Env,
            text: raw.to_string_lossy().into_owned(),
        })?;
        let trimmed = text.trim();
        if !trimmed.is_empty() {
            let v: f32 = trimmed.parse().map_err(|_| ThresholdError::NotANumber {
                origin: ThresholdSource::Env,
                text: text.to_owned(),
            })?;
            if v.is_nan() {
                return Err(ThresholdError::NotANumber {
                    origin: ThresholdSource::Env,
                    text: text.to_owned(),
                });
            }
            return Ok(Threshold {
                value: v,
                source: ThresholdSource::Env,
            });
        }
    }
    if let Some(v) = file_value {
        return checked(v, ThresholdSource::File);
    }
    Ok(Threshold {
        value: 0.0,
        source: ThresholdSource::Default,
    })
}

/// [`resolve_threshold`] reading [`THRESHOLD_ENV`] from this process's environment.
pub fn resolve_threshold_from_env(
    file_value: Option<f32>,
    cli: Option<f32>,
) -> Result<Threshold, ThresholdError> {
    let env = std::env::var_os(THRESHOLD_ENV);
    resolve_threshold(file_value, cli, env.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(s: &str) -> Option<&OsStr> {
        Some(OsStr::new(s))
    }

    #[test]
    fn precedence() {
        let r = |f, c, e| resolve_threshold(f, c, e).unwrap();
        assert_eq!(
            r(None, None, None),
            Threshold {
                value: 0.0,
                source: ThresholdSource::Default
            }
        );
        assert_eq!(r(Some(0.1), None, None).source, ThresholdSource::File);
        assert_eq!(r(Some(0.1), None, None).value, 0.1);
        assert_eq!(r(Some(0.1), None, env("0.25")).value, 0.25);
        assert_eq!(r(Some(0.1), None, env("0.25")).source, ThresholdSource::Env);
        assert_eq!(r(Some(0.1), Some(-1.0), env("0.25")).value, -1.0);
        assert_eq!(
            r(Some(0.1), Some(-1.0), env("0.25")).source,
            ThresholdSource::Cli
        );
        // Blank env counts as unset; surrounding spaces are tolerated.
        assert_eq!(r(Some(0.1), None, env("  ")).source, ThresholdSource::File);
        assert_eq!(r(None, None, env(" 0.5 ")).value, 0.5);
        assert_eq!(r(None, None, env("-inf")).value, f32::NEG_INFINITY);
        assert_eq!(r(None, None, env("-1e30")).value, -1e30);
        // The CLI wins even over a malformed env value.
        assert_eq!(r(None, Some(0.3), env("abc")).value, 0.3);
    }

    #[test]
    fn not_a_number_names_its_source() {
        for (f, c, e, src) in [
            (None, None, env("abc"), ThresholdSource::Env),
            (None, None, env("nan"), ThresholdSource::Env),
            (None, None, env("NaN"), ThresholdSource::Env),
            (None, None, env("0.1x"), ThresholdSource::Env),
            (None, Some(f32::NAN), None, ThresholdSource::Cli),
            (Some(f32::NAN), None, None, ThresholdSource::File),
        ] {
            let e = resolve_threshold(f, c, e).unwrap_err();
            let ThresholdError::NotANumber { origin, .. } = &e;
            assert_eq!(*origin, src, "{e}");
        }
        let msg = resolve_threshold(None, None, env("abc"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("LLAMA_SPARSE_PRED_THRESHOLD") && msg.contains("abc"),
            "{msg}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn non_utf8_env_is_an_error() {
        use std::os::unix::ffi::OsStrExt;
        let raw = OsStr::from_bytes(&[0x30, 0xff]);
        assert!(resolve_threshold(None, None, Some(raw)).is_err());
    }
}
