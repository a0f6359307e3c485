//! The retry options beyond the original's four settings, from Python values
//! and back: `jitter`, `seed`, `non_retryable`, `policies`,
//! `max_retry_duration` and `retry_budget`, for the RetryManager's keywords
//! and the config's `retry_*` fields alike.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple};

use crate::bindings::args;
use crate::retry::budget::BudgetSettings;
use crate::retry::failure_policy::{FailureClasses, PolicyOverride, ReasonPattern};
use crate::retry::jitter::Jitter;
use crate::retry::state::{BudgetStatus, RetryOptions};

/// The Python values of the options, each None when not given. `names`
/// spells each option as the caller sees it (`jitter` or
/// `config.retry_jitter`).
pub struct OptionArgs<'a, 'py> {
    pub jitter: Option<&'a Bound<'py, PyAny>>,
    pub seed: Option<&'a Bound<'py, PyAny>>,
    pub non_retryable: Option<&'a Bound<'py, PyAny>>,
    pub policies: Option<&'a Bound<'py, PyAny>>,
    pub max_retry_duration: Option<&'a Bound<'py, PyAny>>,
    pub retry_budget: Option<&'a Bound<'py, PyAny>>,
}

pub struct OptionNames {
    pub jitter: &'static str,
    pub seed: &'static str,
    pub non_retryable: &'static str,
    pub policies: &'static str,
    pub max_retry_duration: &'static str,
    pub retry_budget: &'static str,
}

pub const KEYWORD_NAMES: OptionNames = OptionNames {
    jitter: "jitter",
    seed: "seed",
    non_retryable: "non_retryable",
    policies: "policies",
    max_retry_duration: "max_retry_duration",
    retry_budget: "retry_budget",
};

pub const CONFIG_NAMES: OptionNames = OptionNames {
    jitter: "config.retry_jitter",
    seed: "config.retry_seed",
    non_retryable: "config.retry_non_retryable",
    policies: "config.retry_policies",
    max_retry_duration: "config.retry_max_duration",
    retry_budget: "config.retry_budget",
};

fn given<'a, 'py>(value: Option<&'a Bound<'py, PyAny>>) -> Option<&'a Bound<'py, PyAny>> {
    value.filter(|v| !v.is_none())
}

fn value_error(name: &str, requirement: &str, value: &Bound<'_, PyAny>) -> PyErr {
    let shown = value
        .repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| "?".to_owned());
    PyValueError::new_err(format!("{name} must be {requirement}, got {shown}"))
}

pub fn read(a: &OptionArgs<'_, '_>, names: &OptionNames) -> PyResult<RetryOptions> {
    let jitter = match given(a.jitter) {
        None => Jitter::None,
        Some(v) => {
            let text = args::string(names.jitter, v)?;
            Jitter::parse(&text).ok_or_else(|| {
                value_error(
                    names.jitter,
                    "one of 'none', 'full', 'equal', 'decorrelated'",
                    v,
                )
            })?
        }
    };
    let seed = match given(a.seed) {
        None => None,
        Some(v) => Some(seed(names.seed, v)?),
    };
    let non_retryable = match given(a.non_retryable) {
        None => Vec::new(),
        Some(v) => patterns(names.non_retryable, v)?,
    };
    let overrides = match given(a.policies) {
        None => Vec::new(),
        Some(v) => policies(names.policies, v)?,
    };
    let classes = FailureClasses::new(non_retryable, overrides)
        .map_err(|e| PyValueError::new_err(format!("{}: {e}", names.policies)))?;
    let max_retry_duration = match given(a.max_retry_duration) {
        None => None,
        Some(v) => {
            let seconds = args::number(names.max_retry_duration, v)?;
            if !(seconds.is_finite() && seconds > 0.0) {
                return Err(value_error(
                    names.max_retry_duration,
                    "a finite number of seconds > 0, or None",
                    v,
                ));
            }
            Some(seconds)
        }
    };
    let budget = match given(a.retry_budget) {
        None => None,
        Some(v) => Some(budget(names.retry_budget, v)?),
    };
    Ok(RetryOptions {
        jitter,
        seed,
        classes,
        max_retry_duration,
        budget,
    })
}

/// Any int that fits 64 bits, signed or not.
fn seed(name: &str, value: &Bound<'_, PyAny>) -> PyResult<u64> {
    args::saturating_int(name, value)?;
    if let Ok(v) = value.extract::<u64>() {
        return Ok(v);
    }
    match value.extract::<i64>() {
        Ok(v) => Ok(v as u64),
        Err(_) => Err(value_error(name, "an int that fits in 64 bits", value)),
    }
}

/// A reason pattern, or an iterable of them.
fn patterns(name: &str, value: &Bound<'_, PyAny>) -> PyResult<Vec<ReasonPattern>> {
    if let Ok(s) = value.cast::<PyString>() {
        return Ok(vec![ReasonPattern::new(s.to_str()?)]);
    }
    let items = value
        .try_iter()
        .map_err(|_| args::type_error(name, "a list of reasons", value))?;
    let mut out = Vec::new();
    for item in items {
        let item = item?;
        out.push(ReasonPattern::new(&args::string(
            &format!("{name} item"),
            &item,
        )?));
    }
    Ok(out)
}

const POLICY_KEYS: [&str; 4] = ["max_attempts", "initial_delay", "backoff_base", "max_delay"];

/// `{reason: {max_attempts, initial_delay, backoff_base, max_delay}}`, each
/// setting optional.
fn policies(
    name: &str,
    value: &Bound<'_, PyAny>,
) -> PyResult<Vec<(ReasonPattern, PolicyOverride)>> {
    let dict = value
        .cast::<PyDict>()
        .map_err(|_| args::type_error(name, "a dict of reason -> policy", value))?;
    let mut out = Vec::new();
    for (reason, policy) in dict.iter() {
        let reason = args::string(&format!("{name} key"), &reason)?.into_owned();
        let here = format!("{name}[{}]", args::quoted(&reason));
        let policy = policy
            .cast::<PyDict>()
            .map_err(|_| args::type_error(&here, "a dict of settings", &policy))?;
        let mut o = PolicyOverride::default();
        for (key, setting) in policy.iter() {
            let key = args::string(&format!("{here} key"), &key)?;
            let field = format!("{here}[{}]", args::quoted(&key));
            match key.as_ref() {
                "max_attempts" => o.max_attempts = Some(args::non_negative_int(&field, &setting)?),
                "initial_delay" => o.initial_delay = Some(args::number(&field, &setting)?),
                "backoff_base" => o.backoff_base = Some(args::number(&field, &setting)?),
                "max_delay" => o.max_delay = Some(args::number(&field, &setting)?),
                other => {
                    return Err(PyValueError::new_err(format!(
                        "{here}: unknown setting {} (known: {})",
                        args::quoted(other),
                        POLICY_KEYS.join(", ")
                    )))
                }
            }
        }
        o.validate()
            .map_err(|e| PyValueError::new_err(format!("{here}: {e}")))?;
        out.push((ReasonPattern::new(&reason), o));
    }
    Ok(out)
}

/// A capacity (int), or `{capacity, retry_cost, success_refill}`, each
/// optional (the AWS SDKs' 500, 5 and 1).
fn budget(name: &str, value: &Bound<'_, PyAny>) -> PyResult<BudgetSettings> {
    let mut settings = BudgetSettings::default();
    if let Ok(dict) = value.cast::<PyDict>() {
        for (key, v) in dict.iter() {
            let key = args::string(&format!("{name} key"), &key)?;
            let field = format!("{name}[{}]", args::quoted(&key));
            let n = args::non_negative_int(&field, &v)?;
            match key.as_ref() {
                "capacity" => settings.capacity = n,
                "retry_cost" => settings.retry_cost = n,
                "success_refill" => settings.success_refill = n,
                other => {
                    return Err(PyValueError::new_err(format!(
                        "{name}: unknown setting {} (known: capacity, retry_cost, success_refill)",
                        args::quoted(other)
                    )))
                }
            }
        }
    } else {
        settings.capacity = args::non_negative_int(name, value)
            .map_err(|_| value_error(name, "an int capacity >= 0, a dict or None", value))?;
    }
    settings
        .validate()
        .map_err(|e| PyValueError::new_err(format!("{name}: {e}")))?;
    Ok(settings)
}

/// `non_retryable` as a tuple of patterns.
pub fn non_retryable_to_py<'py>(
    py: Python<'py>,
    options: &RetryOptions,
) -> PyResult<Bound<'py, PyTuple>> {
    PyTuple::new(
        py,
        options.classes.non_retryable().iter().map(|p| p.as_str()),
    )
}

/// `policies` as a dict of the settings each one gives.
pub fn policies_to_py<'py>(
    py: Python<'py>,
    options: &RetryOptions,
) -> PyResult<Bound<'py, PyDict>> {
    let out = PyDict::new(py);
    for (pattern, o) in options.classes.overrides() {
        let d = PyDict::new(py);
        if let Some(v) = o.max_attempts {
            d.set_item("max_attempts", v)?;
        }
        for (key, v) in [
            ("initial_delay", o.initial_delay),
            ("backoff_base", o.backoff_base),
            ("max_delay", o.max_delay),
        ] {
            if let Some(v) = v {
                d.set_item(key, v)?;
            }
        }
        out.set_item(pattern.as_str(), d)?;
    }
    Ok(out)
}

/// The budget's settings and level, or None without one.
pub fn budget_to_py<'py>(
    py: Python<'py>,
    status: Option<BudgetStatus>,
) -> PyResult<Bound<'py, PyAny>> {
    let Some(b) = status else {
        return Ok(py.None().into_bound(py));
    };
    let d = PyDict::new(py);
    d.set_item("capacity", b.settings.capacity)?;
    d.set_item("retry_cost", b.settings.retry_cost)?;
    d.set_item("success_refill", b.settings.success_refill)?;
    d.set_item("tokens", b.tokens)?;
    d.set_item("exhausted", b.tokens < b.settings.retry_cost)?;
    d.set_item("refused", b.refused)?;
    Ok(d.into_any())
}
