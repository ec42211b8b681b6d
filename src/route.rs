//! Which targets own which table: built once from the configuration, pure.

use std::collections::HashMap;

use crate::config::Target;
use crate::table::TableName;

/// Index of a target in the configuration's (name-ordered) target list.
pub type TargetIdx = usize;

/// The table → owning targets map.
#[derive(Debug, Clone, Default)]
pub struct Router {
    by_table: HashMap<TableName, Vec<TargetIdx>>,
}

impl Router {
    /// Builds the map; a table listed by several targets fans out to all of them.
    pub fn new(targets: &[Target]) -> Router {
        let mut by_table: HashMap<TableName, Vec<TargetIdx>> = HashMap::new();
        for (i, t) in targets.iter().enumerate() {
            for table in &t.tables {
                let owners = by_table.entry(table.clone()).or_default();
                if !owners.contains(&i) {
                    owners.push(i);
                }
            }
        }
        Router { by_table }
    }

    /// Targets owning `table`; empty when the table is not routed.
    pub fn targets_for(&self, table: &TableName) -> &[TargetIdx] {
        self.by_table.get(table).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Every routed table, sorted.
    pub fn tables(&self) -> Vec<TableName> {
        let mut v: Vec<TableName> = self.by_table.keys().cloned().collect();
        v.sort();
        v
    }
}

/// A target owning `tables`, for unit tests of routing.
#[cfg(test)]
pub(crate) fn test_target(name: &str, tables: &[&str]) -> Target {
    Target {
        name: name.into(),
        conn: crate::conninfo::ConnInfo::parse("postgresql://u@h/d").unwrap(),
        tables: tables
            .iter()
            .map(|t| TableName::parse(t).unwrap())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(name: &str, tables: &[&str]) -> Target {
        test_target(name, tables)
    }

    #[test]
    fn fans_out_and_defaults_to_public() {
        let r = Router::new(&[
            target("patient", &["patients", "allergies"]),
            target("billing", &["public.patients", "billing.claims"]),
        ]);
        assert_eq!(
            r.targets_for(&TableName::parse("patients").unwrap()),
            &[0, 1]
        );
        assert_eq!(r.targets_for(&TableName::parse("allergies").unwrap()), &[0]);
        assert_eq!(
            r.targets_for(&TableName::parse("billing.claims").unwrap()),
            &[1]
        );
        assert!(r
            .targets_for(&TableName::parse("audit").unwrap())
            .is_empty());
        assert_eq!(r.tables().len(), 3);
    }
}
