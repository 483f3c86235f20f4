//! The one SQL surface both backends answer: a store call writes its statements once, with
//! SQLite's `?N` parameters, and runs them on a [`Tx`] — an SQLite connection or transaction, or
//! a PostgreSQL one (the parameters become `$N`). Values cross as [`Val`] (integers and text:
//! the schema of both backends holds nothing else) and rows read back through [`Row::get`]. The
//! few statements that differ between the two ask [`Tx::dialect`].

use std::collections::HashMap;

use super::{JobState, Result, StoreError};

/// Which SQL the connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// A statement parameter.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Val<'a> {
    Null,
    Int(i64),
    Text(&'a str),
}

/// What converts into a statement parameter.
pub(crate) trait ToVal {
    fn to_val(&self) -> Val<'_>;
}

impl ToVal for i64 {
    fn to_val(&self) -> Val<'_> {
        Val::Int(*self)
    }
}
impl ToVal for i32 {
    fn to_val(&self) -> Val<'_> {
        Val::Int(*self as i64)
    }
}
impl ToVal for bool {
    fn to_val(&self) -> Val<'_> {
        Val::Int(*self as i64)
    }
}
impl ToVal for str {
    fn to_val(&self) -> Val<'_> {
        Val::Text(self)
    }
}
impl ToVal for String {
    fn to_val(&self) -> Val<'_> {
        Val::Text(self)
    }
}
impl ToVal for JobState {
    fn to_val(&self) -> Val<'_> {
        Val::Text(self.as_str())
    }
}
impl<T: ToVal + ?Sized> ToVal for &T {
    fn to_val(&self) -> Val<'_> {
        (**self).to_val()
    }
}
impl<T: ToVal> ToVal for Option<T> {
    fn to_val(&self) -> Val<'_> {
        match self {
            Some(v) => v.to_val(),
            None => Val::Null,
        }
    }
}

/// The parameters of a statement: `p![a, b]`.
macro_rules! p {
    () => { &[] as &[$crate::server::store::db::Val<'_>] };
    ($($x:expr),+ $(,)?) => { &[$($crate::server::store::db::ToVal::to_val(&$x)),+] as &[$crate::server::store::db::Val<'_>] };
}
pub(super) use p;

impl rusqlite::ToSql for Val<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, Value, ValueRef};
        Ok(match *self {
            Val::Null => ToSqlOutput::Owned(Value::Null),
            Val::Int(i) => ToSqlOutput::Owned(Value::Integer(i)),
            Val::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
        })
    }
}

impl postgres::types::ToSql for Val<'_> {
    fn to_sql(
        &self,
        ty: &postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use postgres::types::Type;
        match *self {
            Val::Null => Ok(postgres::types::IsNull::Yes),
            Val::Int(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(i)?.to_sql(ty, out),
                Type::BOOL => (i != 0).to_sql(ty, out),
                _ => Err(format!("an integer parameter where PostgreSQL expects {ty}").into()),
            },
            Val::Text(s) => s.to_sql(ty, out),
        }
    }

    fn accepts(ty: &postgres::types::Type) -> bool {
        use postgres::types::Type;
        matches!(
            *ty,
            Type::INT8
                | Type::INT4
                | Type::INT2
                | Type::BOOL
                | Type::TEXT
                | Type::VARCHAR
                | Type::BPCHAR
                | Type::NAME
        )
    }

    postgres::types::to_sql_checked!();
}

/// A value read from a row, before it becomes a Rust type.
pub(crate) enum Got<'a> {
    Null,
    Int(i64),
    Text(&'a str),
}

/// One result row of either backend.
pub(crate) enum Row<'a> {
    Sqlite(&'a rusqlite::Row<'a>),
    Postgres(&'a postgres::Row),
}

/// What a column converts into.
pub(crate) trait FromVal: Sized {
    fn from_got(v: Got<'_>) -> std::result::Result<Self, String>;
}

impl FromVal for i64 {
    fn from_got(v: Got<'_>) -> std::result::Result<Self, String> {
        match v {
            Got::Int(i) => Ok(i),
            Got::Null => Err("NULL where an integer was expected".into()),
            Got::Text(t) => Err(format!("text {t:?} where an integer was expected")),
        }
    }
}
impl FromVal for i32 {
    fn from_got(v: Got<'_>) -> std::result::Result<Self, String> {
        i32::try_from(i64::from_got(v)?).map_err(|e| e.to_string())
    }
}
impl FromVal for bool {
    fn from_got(v: Got<'_>) -> std::result::Result<Self, String> {
        Ok(i64::from_got(v)? != 0)
    }
}
impl FromVal for String {
    fn from_got(v: Got<'_>) -> std::result::Result<Self, String> {
        match v {
            Got::Text(t) => Ok(t.to_string()),
            Got::Null => Err("NULL where text was expected".into()),
            Got::Int(i) => Err(format!("integer {i} where text was expected")),
        }
    }
}
impl FromVal for JobState {
    fn from_got(v: Got<'_>) -> std::result::Result<Self, String> {
        let name = String::from_got(v)?;
        JobState::from_name(&name).ok_or_else(|| format!("unknown job state {name:?}"))
    }
}
impl<T: FromVal> FromVal for Option<T> {
    fn from_got(v: Got<'_>) -> std::result::Result<Self, String> {
        match v {
            Got::Null => Ok(None),
            v => T::from_got(v).map(Some),
        }
    }
}

impl Row<'_> {
    /// Column `i` as a `T`.
    pub(crate) fn get<T: FromVal>(&self, i: usize) -> Result<T> {
        let converted = match self {
            Row::Sqlite(r) => {
                use rusqlite::types::ValueRef;
                match r.get_ref(i)? {
                    ValueRef::Null => T::from_got(Got::Null),
                    ValueRef::Integer(n) => T::from_got(Got::Int(n)),
                    ValueRef::Text(t) => match std::str::from_utf8(t) {
                        Ok(s) => T::from_got(Got::Text(s)),
                        Err(e) => Err(e.to_string()),
                    },
                    ValueRef::Real(f) => Err(format!("real {f} where an integer or text was expected")),
                    ValueRef::Blob(_) => Err("a blob where an integer or text was expected".into()),
                }
            }
            Row::Postgres(r) => {
                use postgres::types::Type;
                let column = |e: postgres::Error| StoreError::Corrupt {
                    what: format!("reading column {i} of a stored row"),
                    source: Box::new(e),
                };
                let ty = r.columns().get(i).map(|c| c.type_().clone());
                match ty {
                    Some(Type::INT8) => r
                        .try_get::<_, Option<i64>>(i)
                        .map_err(column)?
                        .map_or(T::from_got(Got::Null), |n| T::from_got(Got::Int(n))),
                    Some(Type::INT4) => r
                        .try_get::<_, Option<i32>>(i)
                        .map_err(column)?
                        .map_or(T::from_got(Got::Null), |n| T::from_got(Got::Int(n as i64))),
                    Some(Type::INT2) => r
                        .try_get::<_, Option<i16>>(i)
                        .map_err(column)?
                        .map_or(T::from_got(Got::Null), |n| T::from_got(Got::Int(n as i64))),
                    Some(Type::BOOL) => r
                        .try_get::<_, Option<bool>>(i)
                        .map_err(column)?
                        .map_or(T::from_got(Got::Null), |b| T::from_got(Got::Int(b as i64))),
                    Some(_) => r
                        .try_get::<_, Option<&str>>(i)
                        .map_err(column)?
                        .map_or(T::from_got(Got::Null), |s| T::from_got(Got::Text(s))),
                    None => Err(format!("the row has no column {i}")),
                }
            }
        };
        converted.map_err(|e| StoreError::Corrupt {
            what: format!("reading column {i} of a stored row"),
            source: e.into(),
        })
    }
}

/// A connection (or a transaction on one) that runs the store's statements.
pub(crate) trait Tx {
    fn dialect(&self) -> Dialect;
    /// Runs a statement; the number of rows it changed.
    fn exec(&mut self, sql: &str, params: &[Val<'_>]) -> Result<u64>;
    /// Runs a query, handing each row to `f`.
    fn each(
        &mut self,
        sql: &str,
        params: &[Val<'_>],
        f: &mut dyn FnMut(&Row<'_>) -> Result<()>,
    ) -> Result<()>;
}

impl dyn Tx + '_ {
    /// The first row of a query, if any.
    pub(crate) fn opt<T>(
        &mut self,
        sql: &str,
        params: &[Val<'_>],
        f: impl FnOnce(&Row<'_>) -> Result<T>,
    ) -> Result<Option<T>> {
        let mut f = Some(f);
        let mut out = None;
        self.each(sql, params, &mut |r| {
            if let Some(f) = f.take() {
                out = Some(f(r)?);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// The first row of a query that always returns one.
    pub(crate) fn one<T>(
        &mut self,
        sql: &str,
        params: &[Val<'_>],
        f: impl FnOnce(&Row<'_>) -> Result<T>,
    ) -> Result<T> {
        self.opt(sql, params, f)?.ok_or_else(|| StoreError::Corrupt {
            what: format!("a query that returns a row returned none: {sql}"),
            source: "no row".into(),
        })
    }

    /// Every row of a query.
    pub(crate) fn all<T>(
        &mut self,
        sql: &str,
        params: &[Val<'_>],
        mut f: impl FnMut(&Row<'_>) -> Result<T>,
    ) -> Result<Vec<T>> {
        let mut out = Vec::new();
        self.each(sql, params, &mut |r| {
            out.push(f(r)?);
            Ok(())
        })?;
        Ok(out)
    }

    /// Whether a query returns a row.
    pub(crate) fn exists(&mut self, sql: &str, params: &[Val<'_>]) -> Result<bool> {
        Ok(self.opt(sql, params, |_| Ok(()))?.is_some())
    }

    /// `" FOR UPDATE"` on PostgreSQL, where concurrent replicas need the row lock; nothing on
    /// SQLite, whose one writer already serialises the transactions.
    pub(crate) fn for_update(&self) -> &'static str {
        match self.dialect() {
            Dialect::Sqlite => "",
            Dialect::Postgres => " FOR UPDATE",
        }
    }

    /// Wakes the waiting dequeues of every replica when this transaction commits (PostgreSQL's
    /// `NOTIFY`; nothing on SQLite, whose one process wakes its own).
    pub(crate) fn notify_jobs(&mut self) -> Result<()> {
        if self.dialect() == Dialect::Postgres {
            self.exec(&format!("NOTIFY {}", super::pg::JOBS_CHANNEL), &[])?;
        }
        Ok(())
    }
}

/// SQLite: statements through the connection's prepared-statement cache.
pub(crate) struct SqliteTx<'a>(pub &'a rusqlite::Connection);

impl Tx for SqliteTx<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    fn exec(&mut self, sql: &str, params: &[Val<'_>]) -> Result<u64> {
        let mut stmt = self.0.prepare_cached(sql)?;
        Ok(stmt.execute(rusqlite::params_from_iter(params.iter()))? as u64)
    }

    fn each(
        &mut self,
        sql: &str,
        params: &[Val<'_>],
        f: &mut dyn FnMut(&Row<'_>) -> Result<()>,
    ) -> Result<()> {
        let mut stmt = self.0.prepare_cached(sql)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(params.iter()))?;
        while let Some(r) = rows.next()? {
            f(&Row::Sqlite(r))?;
        }
        Ok(())
    }
}

/// `?N` parameters as PostgreSQL's `$N` (the store's statements have no `?` in literals).
pub(crate) fn pg_sql(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(|d| d.is_ascii_digit()) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

/// PostgreSQL: a client (or a transaction on it) with the connection's statement cache.
pub(crate) struct PgTx<'a, C: postgres::GenericClient> {
    pub client: &'a mut C,
    pub cache: &'a mut HashMap<String, postgres::Statement>,
    /// `host:port/database`, for the errors (never the password).
    pub target: &'a str,
}

impl<C: postgres::GenericClient> PgTx<'_, C> {
    fn statement(&mut self, sql: &str) -> Result<postgres::Statement> {
        if let Some(s) = self.cache.get(sql) {
            return Ok(s.clone());
        }
        let stmt = self.client.prepare(&pg_sql(sql)).map_err(|e| super::pg::error(e, self.target))?;
        self.cache.insert(sql.to_string(), stmt.clone());
        Ok(stmt)
    }
}

fn pg_params<'a>(params: &'a [Val<'a>]) -> Vec<&'a (dyn postgres::types::ToSql + Sync)> {
    params.iter().map(|v| v as &(dyn postgres::types::ToSql + Sync)).collect()
}

impl<C: postgres::GenericClient> Tx for PgTx<'_, C> {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn exec(&mut self, sql: &str, params: &[Val<'_>]) -> Result<u64> {
        if params.is_empty() && !sql.contains('?') {
            // Parameterless utility statements (NOTIFY, locks) skip the prepare round trip.
            self.client.batch_execute(sql).map_err(|e| super::pg::error(e, self.target))?;
            return Ok(0);
        }
        let stmt = self.statement(sql)?;
        self.client.execute(&stmt, &pg_params(params)).map_err(|e| super::pg::error(e, self.target))
    }

    fn each(
        &mut self,
        sql: &str,
        params: &[Val<'_>],
        f: &mut dyn FnMut(&Row<'_>) -> Result<()>,
    ) -> Result<()> {
        let stmt = self.statement(sql)?;
        let rows =
            self.client.query(&stmt, &pg_params(params)).map_err(|e| super::pg::error(e, self.target))?;
        for r in &rows {
            f(&Row::Postgres(r))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_become_dollars_for_postgres() {
        assert_eq!(pg_sql("SELECT ?1, ?12 FROM t WHERE a = '?'"), "SELECT $1, $12 FROM t WHERE a = '?'");
    }
}
