//! [`TableName`]: a table as the catalog stores it, schema and relation name.

use std::fmt;

use crate::pg::quote_ident;

/// A table name: schema and relation name as stored in the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    /// Schema (namespace).
    pub schema: String,
    /// Relation name.
    pub name: String,
}

impl TableName {
    /// Parses `schema.table` or `table` (schema `public`).
    pub fn parse(s: &str) -> Option<TableName> {
        let s = s.trim();
        let (schema, name) = match s.split_once('.') {
            Some((a, b)) => (a, b),
            None => ("public", s),
        };
        let ok = |p: &str| !p.is_empty() && !p.contains('.') && !p.contains('"');
        (ok(schema) && ok(name)).then(|| TableName {
            schema: schema.into(),
            name: name.into(),
        })
    }

    /// `"schema"."name"`, quoted for SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_with_default_schema_and_quotes() {
        let t = TableName::parse(" billing.Claims ").unwrap();
        assert_eq!(t.to_string(), "billing.Claims");
        assert_eq!(t.quoted(), "\"billing\".\"Claims\"");
        assert_eq!(TableName::parse("patients").unwrap().schema, "public");
        assert!(TableName::parse("a.b.c").is_none());
        assert!(TableName::parse("\"x\"").is_none());
        assert!(TableName::parse(".x").is_none());
    }
}
