//! The Python exception tree, rooted at `AloraError`. Classes are created once at import
//! (several have two bases, e.g. `ConfigError(AloraError, ValueError)`), and every core
//! `Error` maps to exactly one of them.

use alora_core::Error;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

/// (name, base names): parents come before children.
const TREE: &[(&str, &[&str])] = &[
    ("AloraError", &["Exception"]),
    ("AdapterError", &["AloraError"]),
    ("AdapterFormatError", &["AdapterError"]),
    ("UnsupportedDtypeError", &["AdapterFormatError"]),
    ("AdapterShapeError", &["AdapterError"]),
    ("ConfigError", &["AloraError", "ValueError"]),
    ("CapacityError", &["AloraError"]),
    ("UnknownAdapterError", &["AdapterError", "KeyError"]),
    ("DuplicateAdapterError", &["AdapterError"]),
    ("AdapterBusyError", &["AdapterError"]),
    ("InvalidRequestError", &["AloraError", "ValueError"]),
    ("UnknownRequestError", &["AloraError", "KeyError"]),
    ("StepError", &["AloraError"]),
];

static CLASSES: PyOnceLock<Vec<Py<PyType>>> = PyOnceLock::new();

fn classes(py: Python<'_>) -> PyResult<&Vec<Py<PyType>>> {
    CLASSES.get_or_try_init(py, || {
        let builtins = py.import("builtins")?;
        let type_fn = builtins.getattr("type")?;
        let mut made: Vec<Py<PyType>> = Vec::with_capacity(TREE.len());
        for (name, bases) in TREE {
            let mut base_objs = Vec::new();
            for b in *bases {
                let obj = match TREE.iter().position(|(n, _)| n == b) {
                    Some(i) => made[i].bind(py).clone().into_any(),
                    None => builtins.getattr(*b)?,
                };
                base_objs.push(obj);
            }
            let ns = PyDict::new(py);
            ns.set_item("__module__", "alora._core")?;
            let cls = type_fn.call1((*name, PyTuple::new(py, base_objs)?, ns))?;
            made.push(cls.cast_into::<PyType>()?.unbind());
        }
        Ok(made)
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    for ((name, _), cls) in TREE.iter().zip(classes(m.py())?) {
        m.add(*name, cls.bind(m.py()))?;
    }
    Ok(())
}

fn class_of(e: &Error) -> &'static str {
    match e {
        Error::AdapterFormat { .. } | Error::Io { .. } => "AdapterFormatError",
        Error::UnsupportedDtype { .. } => "UnsupportedDtypeError",
        Error::AdapterShape { .. } => "AdapterShapeError",
        Error::Config { .. } => "ConfigError",
        Error::Capacity(_) => "CapacityError",
        Error::UnknownAdapter(_) => "UnknownAdapterError",
        Error::DuplicateAdapter(_) => "DuplicateAdapterError",
        Error::AdapterBusy { .. } => "AdapterBusyError",
        Error::InvalidRequest(_) => "InvalidRequestError",
        Error::UnknownRequest(_) => "UnknownRequestError",
        Error::Step(_) => "StepError",
    }
}

/// Convert a core error into the matching Python exception.
pub fn to_py(e: Error) -> PyErr {
    Python::attach(|py| {
        let name = class_of(&e);
        match classes(py) {
            Ok(cls) => {
                let i = TREE
                    .iter()
                    .position(|(n, _)| *n == name)
                    .expect("every class is in TREE");
                PyErr::from_type(cls[i].bind(py).clone(), e.to_string())
            }
            Err(err) => err,
        }
    })
}

/// `?`-friendly conversion for core results.
pub trait IntoPyResult<T> {
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for alora_core::Result<T> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}
