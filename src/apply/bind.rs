//! Binding values: pgoutput's text values go to the target exactly as the source's output
//! function wrote them, as text parameters or COPY text rows, never parsed on our side, so the
//! target's input function reads what the source wrote (see `postgres_types::ToSql::encode_format`).
//!
//! Values are PHI: a [`TextParam`]'s `Debug` shows only NULL or a length, and every error here
//! names the table and column, never the value.

use bytes::{BufMut, Bytes, BytesMut};
use postgres_types::{Format, IsNull, ToSql, Type};

use super::error::ApplyError;
use super::statements::{self, Plan, Source};
use crate::link::RelationInfo;
use crate::pgoutput::{Tuple, Value};

/// A value bound as text, so the target's input function parses exactly what the source's
/// output function wrote. `Debug` shows only whether it is NULL and its length.
pub struct TextParam(Option<Bytes>);

impl std::fmt::Debug for TextParam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => f.write_str("NULL"),
            Some(b) => write!(f, "text({} bytes)", b.len()),
        }
    }
}

impl ToSql for TextParam {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match &self.0 {
            None => Ok(IsNull::Yes),
            Some(b) => {
                out.put_slice(b);
                Ok(IsNull::No)
            }
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        Format::Text
    }

    postgres_types::to_sql_checked!();
}

/// Binds a change's values per the statement's plan.
pub(super) fn bind(
    plan: &Plan,
    new: Option<&Tuple>,
    old: Option<&Tuple>,
    rel: &RelationInfo,
) -> Result<Vec<TextParam>, ApplyError> {
    let mut out = Vec::with_capacity(plan.params.len());
    for &(src, i) in &plan.params {
        let tuple = match src {
            Source::New => new,
            Source::Old => old,
        };
        let column = || {
            rel.relation
                .columns
                .get(i)
                .map(|c| c.name.clone())
                .unwrap_or_default()
        };
        let value = tuple.and_then(|t| t.0.get(i)).ok_or_else(|| {
            ApplyError::Plan(statements::PlanError::MissingKey {
                table: rel.table.clone(),
                column: column(),
            })
        })?;
        out.push(match value {
            Value::Null => TextParam(None),
            Value::Text(b) => TextParam(Some(b.clone())),
            Value::Unchanged => {
                return Err(ApplyError::Plan(statements::PlanError::MissingKey {
                    table: rel.table.clone(),
                    column: column(),
                }))
            }
            Value::Binary(_) => {
                return Err(ApplyError::Binary {
                    table: rel.table.clone(),
                    column: column(),
                })
            }
        });
    }
    Ok(out)
}

/// Appends one row in COPY text format (tab-separated, `\N` for NULL, newline-terminated).
pub(super) fn encode_copy_row(
    buf: &mut BytesMut,
    row: &Tuple,
    rel: &RelationInfo,
) -> Result<(), ApplyError> {
    let column = |i: usize| {
        rel.relation
            .columns
            .get(i)
            .map(|c| c.name.clone())
            .unwrap_or_default()
    };
    if row.0.len() != rel.relation.columns.len() {
        return Err(ApplyError::Plan(statements::PlanError::MissingValue {
            table: rel.table.clone(),
            column: column(row.0.len().min(rel.relation.columns.len())),
        }));
    }
    for (i, v) in row.0.iter().enumerate() {
        if i > 0 {
            buf.put_u8(b'\t');
        }
        match v {
            Value::Null => buf.extend_from_slice(b"\\N"),
            Value::Text(b) => statements::copy_escape(buf, b),
            // An insert carries every value; "unchanged" belongs to updates only.
            Value::Unchanged => {
                return Err(ApplyError::Plan(statements::PlanError::MissingValue {
                    table: rel.table.clone(),
                    column: column(i),
                }))
            }
            Value::Binary(_) => {
                return Err(ApplyError::Binary {
                    table: rel.table.clone(),
                    column: column(i),
                })
            }
        }
    }
    buf.put_u8(b'\n');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_param_debug_hides_value() {
        let p = TextParam(Some(Bytes::from_static(b"Alice")));
        assert_eq!(format!("{p:?}"), "text(5 bytes)");
    }
}
