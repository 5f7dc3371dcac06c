//! SQL for analysts over the Postgres wire protocol (`psql`, Grafana, Metabase, any driver),
//! served by `datafusion-postgres` on the same DataFusion sessions as `beacon sql`.
//!
//! Who you are decides what you see, in the plan, not by trusting the query text:
//! - user `<merchant id>`, password `<read token>` of that merchant: a session built by
//!   [`Warehouse::merchant_session`], whose every table is a view filtered on the merchant,
//!   so joins, subqueries and `information_schema` only ever reach that merchant's rows;
//! - user `<admin token name>`, password `<admin token secret>`: every row.
//!
//! Every session is read-only: only queries (`SELECT`, `EXPLAIN`, `SHOW`) and transaction
//! no-ops run; `CREATE [EXTERNAL] TABLE`, `COPY`, `SET` of DataFusion options and the like
//! are refused with SQLSTATE 42501 (an external table would read server files). The password
//! arrives in cleartext, as with the HTTP API's bearer tokens: serve it on loopback or behind
//! TLS termination.
//!
//! No connection can take the server down ([`crate::budget`], [`crate::sql_limits`]):
//! - the text of every statement is measured before it is parsed (size, depth, chains);
//! - every query runs under the connection's budget: a memory share, the statement timeout
//!   (`SET statement_timeout` may lower it, never raise it above the operator's limit), the
//!   merchant's running-query slots, and cancellation (psql's Ctrl-C: a Postgres cancel
//!   request with the connection's key stops the running query);
//! - the listener survives accept errors, caps connections per address and in total, and
//!   closes a connection that has not logged in within the startup timeout.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_nats::jetstream::kv;
use async_trait::async_trait;
use beacon_serve::conn_limit::{ConnLimit, Refused};
use beacon_serve::tcp::Acceptor;
use beacon_warehouse::Warehouse;
use datafusion::common::ParamValues;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DfStatementAst;
use datafusion::sql::sqlparser::ast::{Set, Statement};
use datafusion_postgres::datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use datafusion_postgres::datafusion_pg_catalog::setup_pg_catalog;
use datafusion_postgres::hooks::cursor::CursorStatementHook;
use datafusion_postgres::hooks::set_show::SetShowHook;
use datafusion_postgres::hooks::transactions::TransactionStatementHook;
use datafusion_postgres::hooks::HookClient;
use datafusion_postgres::pgwire;
use datafusion_postgres::{DfSessionService, Parser, QueryHook};
use futures::{Sink, SinkExt};
use pgwire::api::auth::{
    finish_authentication, protocol_negotiation, save_startup_parameters_to_metadata,
    DefaultServerParameterProvider, LoginInfo, StartupHandler,
};
use pgwire::api::cancel::CancelHandler;
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{FieldInfo, Response};
use pgwire::api::results::{QueryResponse, Tag};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::PortalStore;
use pgwire::api::{
    ClientInfo, ClientPortalStore, ErrorHandler, PgWireConnectionState, PgWireServerHandlers,
    PidSecretKeyGenerator, RandomPidSecretKeyGenerator, Type,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::cancel::CancelRequest;
use pgwire::messages::startup::Authentication;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use pgwire::types::format::FormatOptions;

/// Checks an admin login: `(user, password) -> allowed`.
pub type AdminCheck = Arc<dyn Fn(&str, &str) -> bool + Send + Sync>;

use crate::budget::{is_out_of_memory, Budget, Scope, Stopped};
use crate::sql_limits::SqlLimits;

/// Limits of the SQL listener itself (query limits are in [`Budget`]).
#[derive(Debug, Clone, Copy)]
pub struct ListenerLimits {
    /// Open connections from one address.
    pub max_conns_per_ip: usize,
    /// Open connections in all.
    pub max_conns: usize,
    /// Time a connection has to log in.
    pub startup_timeout: Duration,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            max_conns_per_ip: 32,
            max_conns: 512,
            startup_timeout: Duration::from_secs(10),
        }
    }
}

/// Cancel keys of logged-in connections: `(pid, secret)` -> the connection's cancel signal.
type CancelKeys = Arc<Mutex<HashMap<(i32, Vec<u8>), tokio::sync::watch::Sender<u64>>>>;

/// What every connection shares.
pub struct SqlServer {
    warehouse: Arc<Warehouse>,
    merchants: kv::Store,
    admin: AdminCheck,
    budget: Arc<Budget>,
    listener: ListenerLimits,
    cancel_keys: CancelKeys,
}

/// The statement type `DfSessionService` uses (its cursor hook downcasts to it).
type DfStatement = (String, Option<(Statement, LogicalPlan)>);

fn error(code: &str, message: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".into(),
        code.into(),
        message.into(),
    )))
}

impl SqlServer {
    pub fn new(
        warehouse: Arc<Warehouse>,
        merchants: kv::Store,
        admin: AdminCheck,
        budget: Arc<Budget>,
        listener: ListenerLimits,
    ) -> Arc<Self> {
        Arc::new(Self {
            warehouse,
            merchants,
            admin,
            budget,
            listener,
            cancel_keys: Arc::default(),
        })
    }

    /// Serves connections from `listener` until `shutdown` resolves. Accept errors (out of
    /// file descriptors) are retried with back-off, never the end of the listener.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        let mut acceptor = Acceptor::new(listener, "sql-pg");
        let conns = ConnLimit::with_total(self.listener.max_conns_per_ip, self.listener.max_conns);
        tokio::pin!(shutdown);
        loop {
            let (socket, peer) = tokio::select! {
                accepted = acceptor.accept() => accepted,
                _ = &mut shutdown => return Ok(()),
            };
            let slot = match conns.try_take(peer.ip()) {
                Ok(slot) => slot,
                Err(why) => {
                    tracing::debug!(%peer, ?why, "SQL connection refused");
                    refuse(socket, why);
                    continue;
                }
            };
            let connection = Arc::new(Connection {
                server: self.clone(),
                session: Arc::new(OnceLock::new()),
            });
            let startup_timeout = self.listener.startup_timeout;
            tokio::spawn(async move {
                let logged_in = connection.session.clone();
                let work = pgwire::tokio::process_socket(socket, None, connection);
                tokio::pin!(work);
                let ended = tokio::select! {
                    ended = &mut work => Some(ended),
                    _ = tokio::time::sleep(startup_timeout) => None,
                };
                let ended = match ended {
                    Some(ended) => ended,
                    None if logged_in.get().is_some() => work.await,
                    None => {
                        tracing::debug!(%peer, "SQL connection closed: no login within the startup timeout");
                        return;
                    }
                };
                if let Err(e) = ended {
                    tracing::debug!(%peer, error = %e, "SQL connection ended");
                }
                drop(slot);
            });
        }
    }

    /// The session for a login, or `None` if the credentials are wrong.
    async fn login(
        &self,
        user: &str,
        password: &str,
    ) -> PgWireResult<Option<(SessionContext, Arc<Scope>)>> {
        let failed = |e: String| error("58000", format!("login check failed: {e}"));
        let timeout = self.budget.limits().statement_timeout;
        let (base, scope) = if (self.admin)(user, password) {
            let ctx = self
                .warehouse
                .serving_session()
                .await
                .map_err(|e| failed(e.to_string()))?;
            (ctx, Scope::new(format!("admin:{user}"), timeout))
        } else {
            let owner = crate::tokens::merchant_for(&self.merchants, password)
                .await
                .map_err(|e| failed(e.to_string()))?;
            if owner.as_deref() != Some(user) {
                return Ok(None);
            }
            let ctx = self
                .warehouse
                .merchant_session(user)
                .await
                .map_err(|e| failed(e.to_string()))?;
            (ctx, Scope::new(user, timeout))
        };
        let ctx = self
            .budget
            .session(&base, scope.clone())
            .map_err(|e| failed(e.to_string()))?;
        // psql's \d and BI tools read pg_catalog; it lists this session's tables only.
        setup_pg_catalog(&ctx, beacon_warehouse::CATALOG_NAME, EmptyContextProvider)
            .map_err(|e| failed(e.to_string()))?;
        ctx.register_udf(crate::pg_rows::map_to_json_udf());
        Ok(Some((ctx, scope)))
    }
}

/// Answers a refused connection with a Postgres error (clients print its message) and
/// closes it.
fn refuse(mut socket: tokio::net::TcpStream, why: Refused) {
    let message = match why {
        Refused::PerAddress => "too many connections from this address",
        Refused::Total => "too many connections to this server",
    };
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let _ = socket
            .write_all(&crate::pg_rows::fatal_error("53300", message))
            .await;
        let _ = socket.shutdown().await;
    });
}

/// One client connection: the session is set once the login succeeds.
struct Connection {
    server: Arc<SqlServer>,
    session: Arc<OnceLock<Arc<DfSessionService>>>,
}

impl PgWireServerHandlers for Connection {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        Arc::new(Queries {
            session: self.session.clone(),
            limits: self.server.budget.limits().sql,
        })
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        Arc::new(Queries {
            session: self.session.clone(),
            limits: self.server.budget.limits().sql,
        })
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        Arc::new(Login {
            server: self.server.clone(),
            session: self.session.clone(),
        })
    }

    fn error_handler(&self) -> Arc<impl ErrorHandler> {
        Arc::new(Errors)
    }

    fn cancel_handler(&self) -> Arc<impl CancelHandler> {
        Arc::new(Cancels {
            keys: self.server.cancel_keys.clone(),
        })
    }
}

/// Turns budget stops and DataFusion's memory errors into the SQLSTATEs clients know.
struct Errors;

impl ErrorHandler for Errors {
    fn on_error<C>(&self, _client: &C, error: &mut PgWireError)
    where
        C: ClientInfo,
    {
        let PgWireError::ApiError(inner) = &*error else {
            return;
        };
        let Some(df) = inner.downcast_ref::<datafusion::error::DataFusionError>() else {
            return;
        };
        let mapped = if let Some(stopped) = Stopped::of(df) {
            Some((stopped.sqlstate(), stopped.to_string()))
        } else if is_out_of_memory(df) {
            Some(("53200", df.to_string()))
        } else {
            None
        };
        if let Some((code, message)) = mapped {
            *error = self::error(code, message);
        }
    }
}

/// Postgres cancel requests (a new connection carrying a logged-in connection's key).
struct Cancels {
    keys: CancelKeys,
}

#[async_trait]
impl CancelHandler for Cancels {
    async fn on_cancel_request(&self, request: CancelRequest) {
        let key = (request.pid, request.secret_key.to_bytes().to_vec());
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = keys.get(&key) {
            tx.send_modify(|n| *n += 1);
        }
    }
}

/// Removes a connection's cancel key when it closes.
struct CancelKeyGuard {
    keys: CancelKeys,
    key: (i32, Vec<u8>),
}

impl Drop for CancelKeyGuard {
    fn drop(&mut self) {
        self.keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

/// Cleartext password login checked against read tokens and admin tokens (pgwire's own
/// cleartext handler compares with a stored password; we only store token hashes).
struct Login {
    server: Arc<SqlServer>,
    session: Arc<OnceLock<Arc<DfSessionService>>>,
}

#[async_trait]
impl StartupHandler for Login {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                protocol_negotiation(client, startup).await?;
                save_startup_parameters_to_metadata(client, startup);
                client.set_state(PgWireConnectionState::AuthenticationInProgress);
                client
                    .send(PgWireBackendMessage::Authentication(
                        Authentication::CleartextPassword,
                    ))
                    .await?;
            }
            PgWireFrontendMessage::PasswordMessageFamily(pwd) => {
                let pwd = pwd.into_password()?;
                let user = LoginInfo::from_client_info(client)
                    .user()
                    .unwrap_or_default()
                    .to_string();
                let Some((ctx, scope)) = self.server.login(&user, &pwd.password).await? else {
                    tracing::info!(%user, "SQL login refused");
                    return Err(PgWireError::InvalidPassword(user));
                };
                let (pid, secret) = RandomPidSecretKeyGenerator::default().generate(client);
                let key = (pid, secret.to_bytes().to_vec());
                let (cancel_tx, cancel_rx) = tokio::sync::watch::channel(0u64);
                scope.set_cancel(cancel_rx);
                self.server
                    .cancel_keys
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key.clone(), cancel_tx);
                client.session_extensions().insert(Arc::new(CancelKeyGuard {
                    keys: self.server.cancel_keys.clone(),
                    key,
                }));
                client.set_pid_and_secret_key(pid, secret);
                let service = DfSessionService::new_with_hooks(
                    Arc::new(ctx),
                    vec![
                        Arc::new(Guard {
                            scope,
                            max_timeout: self.server.budget.limits().statement_timeout,
                        }) as Arc<dyn QueryHook>,
                        Arc::new(CursorStatementHook),
                        Arc::new(SetShowHook),
                        Arc::new(TransactionStatementHook),
                    ],
                );
                let _ = self.session.set(Arc::new(service));
                finish_authentication(client, &DefaultServerParameterProvider::default()).await?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// Runs queries in the connection's session.
struct Queries {
    session: Arc<OnceLock<Arc<DfSessionService>>>,
    limits: SqlLimits,
}

/// The SQL text limits, checked before the text reaches any parser.
fn check_text(sql: &str, limits: &SqlLimits) -> PgWireResult<()> {
    crate::sql_limits::check(sql, limits).map_err(|e| error(e.sqlstate(), e.to_string()))
}

impl Queries {
    fn service(&self) -> PgWireResult<Arc<DfSessionService>> {
        self.session
            .get()
            .cloned()
            .ok_or_else(|| error("28000", "not logged in"))
    }
}

#[async_trait]
impl SimpleQueryHandler for Queries {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let service = self.service()?;
        check_text(query, &self.limits)?;
        SimpleQueryHandler::do_query(&*service, client, query).await
    }
}

#[async_trait]
impl ExtendedQueryHandler for Queries {
    type Statement = DfStatement;
    type QueryParser = SessionParser;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        Arc::new(SessionParser {
            session: self.session.clone(),
            limits: self.limits,
        })
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Self::Statement>,
        max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let service = self.service()?;
        ExtendedQueryHandler::do_query(&*service, client, portal, max_rows).await
    }
}

/// Parses with the connection's session (its tables and views).
struct SessionParser {
    session: Arc<OnceLock<Arc<DfSessionService>>>,
    limits: SqlLimits,
}

impl SessionParser {
    fn parser(&self) -> PgWireResult<Arc<Parser>> {
        let service = self
            .session
            .get()
            .ok_or_else(|| error("28000", "not logged in"))?;
        Ok(ExtendedQueryHandler::query_parser(&**service))
    }
}

#[async_trait]
impl QueryParser for SessionParser {
    type Statement = DfStatement;

    async fn parse_sql<C>(
        &self,
        client: &C,
        sql: &str,
        types: &[Option<Type>],
    ) -> PgWireResult<Self::Statement>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        check_text(sql, &self.limits)?;
        self.parser()?.parse_sql(client, sql, types).await
    }

    fn get_parameter_types(&self, stmt: &Self::Statement) -> PgWireResult<Vec<Type>> {
        self.parser()?.get_parameter_types(stmt)
    }

    fn get_result_schema(
        &self,
        stmt: &Self::Statement,
        column_format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        self.parser()?.get_result_schema(stmt, column_format)
    }
}

/// Lets only read-only statements through (see the module docs), runs queries itself (maps
/// as JSON text, under the connection's budget) and owns `statement_timeout`.
struct Guard {
    scope: Arc<Scope>,
    /// The operator's limit: the default, and the most `SET statement_timeout` may ask.
    max_timeout: Duration,
}

/// A query's plan, checked read-only, with map columns shown as JSON text.
async fn plan_query(stmt: &Statement, ctx: &SessionContext) -> PgWireResult<LogicalPlan> {
    let api = |e: datafusion::error::DataFusionError| PgWireError::ApiError(Box::new(e));
    let plan = ctx
        .state()
        .statement_to_plan(DfStatementAst::Statement(Box::new(stmt.clone())))
        .await
        .map_err(api)?;
    beacon_warehouse::read_only()
        .verify_plan(&plan)
        .map_err(api)?;
    crate::pg_rows::maps_as_json(plan).map_err(api)
}

/// `None` (let the session's own hooks answer) for `SHOW` and transaction no-ops; the
/// read-only refusal for anything else that is not a query.
fn refuse_unless_harmless<T>(stmt: &Statement) -> Option<PgWireResult<T>> {
    match stmt {
        Statement::ShowVariable { .. }
        | Statement::ShowTables { .. }
        | Statement::ShowColumns { .. }
        | Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. } => None,
        other => Some(Err(refused(other))),
    }
}

fn refused(stmt: &Statement) -> PgWireError {
    error(
        "42501",
        format!(
            "read-only: `{}` is not allowed (queries only)",
            stmt.to_string().chars().take(60).collect::<String>()
        ),
    )
}

/// `statement_timeout` as Postgres spells it: `5000`, `'5s'`, `'250ms'`, `'1min'`; `0` and
/// `DEFAULT` mean the operator's limit.
fn parse_timeout(text: &str, max: Duration) -> PgWireResult<Duration> {
    let t = text
        .trim()
        .trim_matches(|c| c == '\'' || c == '"')
        .trim()
        .to_ascii_lowercase();
    if t.is_empty() || t == "0" || t == "default" {
        return Ok(max);
    }
    let (number, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = number.parse().map_err(|_| {
        error(
            "22023",
            format!(
                "invalid value for statement_timeout: `{text}` (e.g. 5000, '5s', '250ms', '1min')"
            ),
        )
    })?;
    let ms = match unit.trim() {
        "" | "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "min" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => None,
    }
    .ok_or_else(|| {
        error(
            "22023",
            format!("invalid value for statement_timeout: `{text}`"),
        )
    })?;
    let asked = Duration::from_millis(ms);
    if asked > max {
        return Err(error(
            "42501",
            format!(
                "statement_timeout may be at most {} ms on this server (asked {ms} ms)",
                max.as_millis()
            ),
        ));
    }
    Ok(asked)
}

impl Guard {
    /// `SET statement_timeout` and `SHOW statement_timeout`; `None` for other statements.
    fn timeout_statement(&self, stmt: &Statement) -> Option<PgWireResult<Response>> {
        match stmt {
            Statement::Set(Set::SingleAssignment {
                variable, values, ..
            }) if variable
                .to_string()
                .eq_ignore_ascii_case("statement_timeout") =>
            {
                let text = values.first().map(|v| v.to_string()).unwrap_or_default();
                Some(parse_timeout(&text, self.max_timeout).map(|t| {
                    self.scope.set_timeout(t);
                    Response::Execution(Tag::new("SET"))
                }))
            }
            Statement::ShowVariable { variable }
                if variable.len() == 1
                    && variable[0].value.eq_ignore_ascii_case("statement_timeout") =>
            {
                let ms = self.scope.timeout().as_millis();
                Some(
                    crate::pg_rows::single_value("statement_timeout", &format!("{ms}ms"))
                        .map(Response::Query),
                )
            }
            _ => None,
        }
    }
}

#[async_trait]
impl QueryHook for Guard {
    async fn handle_simple_query(
        &self,
        stmt: &Statement,
        ctx: &SessionContext,
        client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        if let Some(answer) = self.timeout_statement(stmt) {
            return Some(answer);
        }
        match stmt {
            Statement::Query(_) | Statement::Explain { .. } => {
                let run = async {
                    let plan = plan_query(stmt, ctx).await?;
                    let df = ctx
                        .execute_logical_plan(plan)
                        .await
                        .map_err(|e| PgWireError::ApiError(Box::new(e)))?;
                    let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
                    let rows: QueryResponse =
                        datafusion_postgres::arrow_pg::datatypes::df::encode_dataframe(
                            df,
                            &Format::UnifiedText,
                            Some(options),
                        )
                        .await?;
                    Ok(Response::Query(rows))
                };
                Some(run.await)
            }
            other => refuse_unless_harmless(other),
        }
    }

    async fn handle_extended_parse_query(
        &self,
        stmt: &Statement,
        ctx: &SessionContext,
        _client: &(dyn ClientInfo + Send + Sync),
    ) -> Option<PgWireResult<LogicalPlan>> {
        match stmt {
            Statement::Query(_) | Statement::Explain { .. } => Some(plan_query(stmt, ctx).await),
            Statement::Set(Set::SingleAssignment { variable, .. })
                if variable
                    .to_string()
                    .eq_ignore_ascii_case("statement_timeout") =>
            {
                None
            }
            other => refuse_unless_harmless(other),
        }
    }

    async fn handle_extended_query(
        &self,
        stmt: &Statement,
        _plan: &LogicalPlan,
        _params: &ParamValues,
        _ctx: &SessionContext,
        _client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        // Queries were checked when parsed and run by the session (under its budget).
        self.timeout_statement(stmt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_timeout_values_are_parsed_and_capped() {
        let max = Duration::from_secs(30);
        assert_eq!(parse_timeout("5000", max).unwrap(), Duration::from_secs(5));
        assert_eq!(parse_timeout("'5s'", max).unwrap(), Duration::from_secs(5));
        assert_eq!(
            parse_timeout("'250ms'", max).unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(parse_timeout("0", max).unwrap(), max);
        assert_eq!(parse_timeout("DEFAULT", max).unwrap(), max);
        let e = parse_timeout("'1min'", max).unwrap_err().to_string();
        assert!(e.contains("at most 30000 ms"), "{e}");
        assert!(parse_timeout("'soon'", max).is_err());
        assert!(parse_timeout("99999999999999999999h", max).is_err());
    }
}
