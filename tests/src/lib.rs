//! Support for the workspace tests in `tests/tests/`: a throwaway Postgres cluster
//! ([`pg`]) and real `plait` processes ([`plait`]). Nothing here is a stand-in: tests talk
//! to a real server binary over real sockets, backed by a real database.

pub mod mirror;
pub mod netns;
pub mod node;
pub mod pg;
pub mod pki;
pub mod plait;
pub mod upstream;
pub mod wire;

/// Makes `mod embedded` and `mod postgres`, each with one test per named `async fn(Store)`
/// of the calling file, run on that store (a fresh Postgres database each).
#[macro_export]
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name($crate::plait::Store::Embedded).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name($crate::plait::Store::fresh_postgres()).await })*
        }
    };
}
