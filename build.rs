//! Passes PyO3's `Py_3_*` cfgs to this crate, so that code can use what each
//! CPython version has (an optional attribute lookup without raising).
fn main() {
    pyo3_build_config::use_pyo3_cfgs();
}
