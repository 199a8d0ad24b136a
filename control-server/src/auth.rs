//! Who may sign in. Accounts live in the [`Store`] with argon2id password hashes; a studio that
//! brings its own accounts implements [`Authenticator`] instead.
//!
//! Hashing is deliberately slow, so it runs on tokio's blocking pool, off the threads that move
//! messages. An unknown account is checked against a dummy hash all the same, so that the
//! answer's timing does not tell which accounts exist.

use std::future::Future;
use std::pin::Pin;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use ring::rand::{SecureRandom, SystemRandom};

use crate::store::{Store, StoreError};

/// The outcome of a sign-in check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The credentials are good; the account's canonical name.
    Accepted(String),
    /// Unknown account or wrong password (deliberately not told apart).
    Refused,
}

/// Why a check could not be made (as opposed to failing).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Hashing failed (bad parameters, a corrupt stored hash).
    #[error("password hashing: {0}")]
    Hash(String),
    /// The operator's own check failed.
    #[error("authenticator: {0}")]
    Operator(String),
}

/// A boxed future, for an object-safe trait.
pub type AuthFuture<'a> = Pin<Box<dyn Future<Output = Result<Verdict, AuthError>> + Send + 'a>>;

/// The operator hook: checks an account and password. Implement it to sign players in against
/// a studio's own account system.
pub trait Authenticator: Send + Sync + std::fmt::Debug {
    /// Checks the credentials.
    fn verify<'a>(&'a self, account: &'a str, password: &'a str) -> AuthFuture<'a>;
}

/// Argon2id cost parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashCost {
    /// Memory, KiB.
    pub memory_kib: u32,
    /// Passes.
    pub iterations: u32,
}

impl Default for HashCost {
    /// OWASP's minimum recommendation for argon2id: 19 MiB, two passes, one lane.
    fn default() -> Self {
        HashCost { memory_kib: 19 * 1024, iterations: 2 }
    }
}

fn argon(cost: HashCost) -> Result<Argon2<'static>, AuthError> {
    let params = Params::new(cost.memory_kib, cost.iterations, 1, None).map_err(|e| AuthError::Hash(e.to_string()))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// Hashes `password` into a PHC string with a fresh random salt.
pub fn hash_password(password: &str, cost: HashCost) -> Result<String, AuthError> {
    let mut salt = [0u8; 16];
    SystemRandom::new().fill(&mut salt).map_err(|_| AuthError::Hash("no system randomness".into()))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| AuthError::Hash(e.to_string()))?;
    let hash = argon(cost)?.hash_password(password.as_bytes(), &salt).map_err(|e| AuthError::Hash(e.to_string()))?;
    Ok(hash.to_string())
}

/// Whether `password` matches the PHC string `hash` (its own parameters are used).
pub fn verify_password(password: &str, hash: &str) -> Result<bool, AuthError> {
    let parsed = PasswordHash::new(hash).map_err(|e| AuthError::Hash(e.to_string()))?;
    Ok(Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
}

/// Accounts in the [`Store`].
#[derive(Debug, Clone)]
pub struct StoreAccounts {
    store: Store,
    cost: HashCost,
    /// Checked when the account does not exist, so that both answers take as long.
    dummy: String,
}

impl StoreAccounts {
    /// Accounts in `store`, new passwords hashed at `cost`.
    pub fn new(store: Store, cost: HashCost) -> Result<StoreAccounts, AuthError> {
        let dummy = hash_password("not a password anyone has", cost)?;
        Ok(StoreAccounts { store, cost, dummy })
    }

    /// Creates an account; false if the name is taken.
    pub async fn create(&self, account: &str, password: &str, now_ms: i64) -> Result<bool, AuthError> {
        let (password, cost) = (password.to_string(), self.cost);
        let hash = tokio::task::spawn_blocking(move || hash_password(&password, cost))
            .await
            .map_err(|e| AuthError::Hash(e.to_string()))??;
        Ok(self.store.create_account(account, &hash, now_ms).await?)
    }
}

impl Authenticator for StoreAccounts {
    fn verify<'a>(&'a self, account: &'a str, password: &'a str) -> AuthFuture<'a> {
        Box::pin(async move {
            let stored = self.store.password_hash(account).await?;
            let known = stored.is_some();
            let hash = stored.unwrap_or_else(|| self.dummy.clone());
            let password = password.to_string();
            let ok = tokio::task::spawn_blocking(move || verify_password(&password, &hash))
                .await
                .map_err(|e| AuthError::Hash(e.to_string()))??;
            Ok(if ok && known { Verdict::Accepted(account.to_string()) } else { Verdict::Refused })
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Small costs keep the tests quick; the parameters travel inside the hash.
    const CHEAP: HashCost = HashCost { memory_kib: 256, iterations: 1 };

    #[test]
    fn hashes_verify_and_differ_by_salt() {
        let a = hash_password("correct horse", CHEAP).unwrap();
        let b = hash_password("correct horse", CHEAP).unwrap();
        assert_ne!(a, b, "each hash has its own salt");
        assert!(a.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &a).unwrap());
        assert!(!verify_password("correct hors", &a).unwrap());
        assert!(verify_password("x", "not a phc string").is_err());
    }

    #[tokio::test]
    async fn store_accounts_accept_only_the_right_password() {
        let dir = std::env::temp_dir().join(format!("shoal-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("auth.db");
        let _ = std::fs::remove_file(&path);
        let store = Store::open(&format!("sqlite:{}", path.display())).await.unwrap();
        let accounts = StoreAccounts::new(store.clone(), CHEAP).unwrap();
        assert!(accounts.create("ana", "s3cret", 1).await.unwrap());
        assert!(!accounts.create("ana", "other", 2).await.unwrap());
        assert_eq!(accounts.verify("ana", "s3cret").await.unwrap(), Verdict::Accepted("ana".into()));
        assert_eq!(accounts.verify("ana", "wrong").await.unwrap(), Verdict::Refused);
        assert_eq!(accounts.verify("nobody", "s3cret").await.unwrap(), Verdict::Refused);
        // The dummy's own password does not open a missing account either.
        assert_eq!(accounts.verify("nobody", "not a password anyone has").await.unwrap(), Verdict::Refused);
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A studio's own check plugs in through the trait.
    #[derive(Debug)]
    struct Studio;

    impl Authenticator for Studio {
        fn verify<'a>(&'a self, account: &'a str, password: &'a str) -> AuthFuture<'a> {
            Box::pin(async move {
                Ok(if account == "guest" && password == "token-123" {
                    Verdict::Accepted("guest".into())
                } else {
                    Verdict::Refused
                })
            })
        }
    }

    #[tokio::test]
    async fn an_operator_hook_decides_instead() {
        let auth: Box<dyn Authenticator> = Box::new(Studio);
        assert_eq!(auth.verify("guest", "token-123").await.unwrap(), Verdict::Accepted("guest".into()));
        assert_eq!(auth.verify("guest", "nope").await.unwrap(), Verdict::Refused);
    }
}
