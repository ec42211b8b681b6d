//! Which targets own which table: built once from the configuration, pure.
//!
//! A routed table is known by its identity, the OID its name had at start-up, not only by its
//! name: a Relation message names the OID, and [`Router::route`] compares its current name
//! with the routed one. A rename or `SET SCHEMA` keeps the OID, so its changes keep reaching
//! the owning targets (under the routed name there); a routed name that now belongs to another
//! OID (the table was dropped and recreated) is never routed silently.

use std::collections::HashMap;

use crate::config::Target;
use crate::table::TableName;

/// Index of a target in the configuration's (name-ordered) target list.
pub type TargetIdx = usize;

/// The table → owning targets map.
#[derive(Debug, Clone, Default)]
pub struct Router {
    by_table: HashMap<TableName, Vec<TargetIdx>>,
    /// The routed name of each routed table's OID at start-up.
    by_oid: HashMap<u32, TableName>,
}

/// How a relation the source describes is routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routing<'a> {
    /// Not a routed table.
    NotRouted,
    /// A routed table under its routed name.
    Routed {
        /// The routed name (also the table's name on the targets).
        table: &'a TableName,
        /// Its owners.
        targets: &'a [TargetIdx],
    },
    /// A routed table renamed or moved on the source since start-up: still routed, under the
    /// routed name on the targets.
    Renamed {
        /// The routed name.
        table: &'a TableName,
        /// Its owners.
        targets: &'a [TargetIdx],
    },
    /// A routed name now held by another table (dropped and recreated, or another table
    /// renamed into it): its changes must not be applied as if nothing happened.
    Replaced {
        /// The routed name.
        table: &'a TableName,
        /// Its owners.
        targets: &'a [TargetIdx],
    },
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
        Router {
            by_table,
            by_oid: HashMap::new(),
        }
    }

    /// Records the OID each routed table had at start-up.
    pub fn set_oids(&mut self, oids: &HashMap<TableName, u32>) {
        self.by_oid = oids
            .iter()
            .filter(|(t, _)| self.by_table.contains_key(*t))
            .map(|(t, oid)| (*oid, t.clone()))
            .collect();
    }

    /// Every routed table with the OID it had at start-up.
    pub fn routed_oids(&self) -> Vec<(TableName, u32)> {
        let mut v: Vec<(TableName, u32)> =
            self.by_oid.iter().map(|(o, t)| (t.clone(), *o)).collect();
        v.sort();
        v
    }

    /// The OID a routed table had at start-up.
    pub fn oid_of(&self, table: &TableName) -> Option<u32> {
        self.by_oid
            .iter()
            .find(|(_, t)| *t == table)
            .map(|(oid, _)| *oid)
    }

    /// How the relation `oid`, now named `name` on the source, is routed.
    pub fn route(&self, oid: u32, name: &TableName) -> Routing<'_> {
        if let Some(table) = self.by_oid.get(&oid) {
            let targets = self.targets_for(table);
            return if table == name {
                Routing::Routed { table, targets }
            } else {
                Routing::Renamed { table, targets }
            };
        }
        match self.by_table.get_key_value(name) {
            // Routed by name, with no OID known for it (start-up did not resolve OIDs).
            Some((table, targets)) if self.oid_of(table).is_none() => {
                Routing::Routed { table, targets }
            }
            Some((table, targets)) => Routing::Replaced { table, targets },
            None => Routing::NotRouted,
        }
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
    fn routes_by_oid_and_follows_renames_but_not_replacements() {
        let mut r = Router::new(&[
            target("patient", &["patients"]),
            target("billing", &["patients", "claims"]),
        ]);
        let patients = TableName::parse("patients").unwrap();
        let claims = TableName::parse("claims").unwrap();
        r.set_oids(&[(patients.clone(), 100), (claims.clone(), 200)].into());
        assert_eq!(r.oid_of(&claims), Some(200));
        assert_eq!(
            r.route(100, &patients),
            Routing::Routed {
                table: &patients,
                targets: &[0, 1]
            }
        );
        // Renamed or moved to another schema: same OID, still routed under the routed name.
        for new in ["patients_v2", "archive.patients"] {
            assert_eq!(
                r.route(100, &TableName::parse(new).unwrap()),
                Routing::Renamed {
                    table: &patients,
                    targets: &[0, 1]
                }
            );
        }
        // Dropped and recreated: the routed name with another OID.
        assert_eq!(
            r.route(300, &patients),
            Routing::Replaced {
                table: &patients,
                targets: &[0, 1]
            }
        );
        assert_eq!(
            r.route(400, &TableName::parse("audit").unwrap()),
            Routing::NotRouted
        );
    }

    #[test]
    fn without_oids_routes_by_name() {
        let r = Router::new(&[target("patient", &["patients"])]);
        let patients = TableName::parse("patients").unwrap();
        assert_eq!(
            r.route(7, &patients),
            Routing::Routed {
                table: &patients,
                targets: &[0]
            }
        );
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
