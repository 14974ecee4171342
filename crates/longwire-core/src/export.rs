use std::sync::Arc;

use crate::Volume;

/// A named volume as clients see it.
#[derive(Clone)]
pub struct Export {
    pub name: String,
    /// Free text shown to clients that list exports.
    pub description: String,
    pub volume: Arc<dyn Volume>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("description", &self.description)
            .field("size", &self.volume.size())
            .finish()
    }
}

/// Maps export names to volumes. Shared by every front-end so one volume
/// served over several protocols has one truth.
#[derive(Debug, Default)]
pub struct ExportRegistry {
    exports: Vec<Export>,
}

impl ExportRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add an export. Names are unique; a duplicate is refused.
    pub fn add(&mut self, export: Export) -> Result<(), String> {
        if self.exports.iter().any(|e| e.name == export.name) {
            return Err(format!("export {:?} is defined twice", export.name));
        }
        self.exports.push(export);
        Ok(())
    }

    /// Look up an export. The empty name asks for the default export: the one
    /// called `default` if there is one, else the first defined.
    pub fn get(&self, name: &str) -> Option<&Export> {
        if name.is_empty() {
            return self.exports.iter().find(|e| e.name == "default").or_else(|| self.exports.first());
        }
        self.exports.iter().find(|e| e.name == name)
    }

    /// All exports in the order they were defined.
    pub fn iter(&self) -> impl Iterator<Item = &Export> {
        self.exports.iter()
    }

    pub fn len(&self) -> usize {
        self.exports.len()
    }

    pub fn is_empty(&self) -> bool {
        self.exports.is_empty()
    }
}
