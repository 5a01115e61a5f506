//! The reconciliation state machines of both peers.
//!
//! A [`Reconciler`] consumes raw-key blocks ([`Reconciler::start_block`]) and peer messages
//! ([`Reconciler::handle_message`]) and returns the messages to send and, when a block
//! ends, its [`BlockOutcome`]. It owns no socket and no clock: the caller carries the bytes
//! over the classical channel and aborts blocks that time out ([`Reconciler::abort_block`]).
//!
//! Roles: the initiator holds the reference key, opens each block and answers parity
//! requests; the responder corrects its key, verifies it and asks for the final key.
//!
//! ```text
//! initiator                                  responder
//! Start(raw bits, seeds, sample, params) --->
//!                                      <---  ParityRequest (open pass / ranges)
//! ParityAnswer                           --->  ... repeated until Cascade is done
//!                                      <---  Verify(errors, leak, length, hash keys, tag)
//! Confirm(tag, length, Toeplitz seed)    --->          or Abort(reason) from either side
//! ```
//!
//! The initiator releases the final key after it found the responder's tag equal to its
//! own; the responder after it found the initiator's tag in `Confirm` equal to its own.
//! Any malformed, tampered, truncated, replayed, reordered or unexpected message ends its
//! block on this side with a discard and an `Abort` for the peer; nothing panics and no
//! block waits for a message that cannot come.

use std::collections::{HashMap, HashSet};

use crate::bits::BitVec;
use crate::cascade::{block_sizes, Corrector, CorrectorStep, ParityOracle, DEFAULT_PASSES};
use crate::finite_key::{final_key_length, SecurityParams};
use crate::message::{
    peek_block_id, Abort, Body, Confirm, DiscardReason, Message, SharedParams, Start, Verify,
};
use crate::rng::{sample_positions, RandomSource};
use crate::toeplitz::toeplitz_hash;
use crate::verify::{collision_bound, tag, HashKeys, TAG_BITS};
use crate::ReconcileError;

/// Largest raw-key block: 2^26 bits, so that bit positions fit the 32-bit wire fields
/// with room to spare and one block stays below about 2 GiB of working memory.
pub const MAX_BLOCK_BITS: usize = 1 << 26;
/// Most START messages a responder buffers for blocks whose raw key it does not have yet.
pub const MAX_PENDING_STARTS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Initiator,
    Responder,
}

/// Settings of one peer. `security` and `qber_limit` must be equal on both peers.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub security: SecurityParams,
    /// Blocks whose QBER exceeds this are discarded on both sides.
    pub qber_limit: f64,
    /// QBER assumed for the first block; `None` discloses a sample instead.
    pub initial_qber: Option<f64>,
    /// Bits disclosed to estimate the QBER when no earlier block gives an estimate; at most
    /// a tenth of the block is used.
    pub sample_bits: usize,
    /// Largest number of Cascade passes: three of fixed-size blocks, then half passes until
    /// [`crate::cascade::CONFIRM_PASSES`] of them in a row find no error.
    pub passes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            security: SecurityParams::default(),
            qber_limit: 0.11,
            initial_qber: None,
            sample_bits: 1024,
            passes: DEFAULT_PASSES,
        }
    }
}

impl Config {
    /// Checks the settings; returns a message naming the invalid value.
    pub fn validate(&self) -> Result<(), ReconcileError> {
        let bad = |what: &str, v: f64, range: &str| {
            Err(ReconcileError::Config(format!(
                "{what} = {v} is invalid: expected {range}"
            )))
        };
        let s = &self.security;
        if !(s.eps_sec > 0.0 && s.eps_sec < 1.0) {
            return bad("eps_sec", s.eps_sec, "0 < eps_sec < 1");
        }
        if !(s.eps_cor > 0.0 && s.eps_cor < 1.0) {
            return bad("eps_cor", s.eps_cor, "0 < eps_cor < 1");
        }
        if !(self.qber_limit > 0.0 && self.qber_limit < 0.5) {
            return bad("qber_limit", self.qber_limit, "0 < qber_limit < 0.5");
        }
        if let Some(q) = self.initial_qber {
            if !(q > 0.0 && q < 0.5) {
                return bad("initial_qber", q, "0 < initial_qber < 0.5");
            }
        }
        if self.passes == 0 || self.passes > crate::cascade::MAX_PASSES {
            return bad(
                "passes",
                self.passes as f64,
                &format!("1 ..= {}", crate::cascade::MAX_PASSES),
            );
        }
        Ok(())
    }

    fn shared(&self) -> SharedParams {
        SharedParams {
            eps_sec: self.security.eps_sec,
            eps_cor: self.security.eps_cor,
            qber_limit: self.qber_limit,
        }
    }
}

/// Counters of one block, for logs, the web page and benchmarks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BlockStats {
    /// Raw key bits the block started with.
    pub raw_bits: u64,
    /// Bits disclosed for the QBER sample and removed from the key.
    pub sample_bits: u64,
    pub sample_errors: u64,
    /// Bits reconciled (raw bits minus sample).
    pub key_bits: u64,
    /// Errors corrected (exact once verified).
    pub errors: u64,
    /// Parity bits disclosed by Cascade.
    pub leak_ec: u64,
    /// Verification-tag bits disclosed.
    pub tag_bits: u64,
    pub final_bits: u64,
    pub messages_sent: u64,
    pub messages_received: u64,
}

impl BlockStats {
    /// QBER measured on the reconciled bits (`errors / key_bits`).
    pub fn qber(&self) -> f64 {
        if self.key_bits == 0 {
            0.0
        } else {
            self.errors as f64 / self.key_bits as f64
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockResult {
    /// Both peers verified the corrected keys equal; this is the final key.
    Verified { key: BitVec },
    /// No key; `by_peer` is true when the peer ended the block.
    Discarded {
        reason: DiscardReason,
        detail: String,
        by_peer: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct BlockOutcome {
    pub block_id: u64,
    pub result: BlockResult,
    pub stats: BlockStats,
}

/// The result of one call: messages for the peer (in order) and maybe a finished block.
#[derive(Debug, Default)]
pub struct Step {
    pub messages: Vec<Vec<u8>>,
    pub outcome: Option<BlockOutcome>,
}

enum Phase {
    /// Responder: raw key present, waiting for the initiator's START.
    AwaitStart { raw: BitVec },
    /// Initiator: answering parity requests until VERIFY arrives.
    Answering { oracle: ParityOracle },
    /// Responder: correcting.
    Correcting { corrector: Corrector },
    /// Responder: VERIFY sent, waiting for CONFIRM.
    AwaitConfirm {
        key: BitVec,
        tag: [u64; 2],
        final_bits: u64,
    },
}

struct Block {
    phase: Phase,
    stats: BlockStats,
    send_seq: u32,
    recv_seq: u32,
}

/// Outcome of handling one message inside a block.
enum Flow {
    Continue(Vec<Body>),
    Finish(Vec<Body>, BlockResult),
}

/// Error inside a block: ends it with an abort to the peer.
struct BlockError {
    reason: DiscardReason,
    detail: String,
}

fn protocol_error(detail: impl Into<String>) -> BlockError {
    BlockError {
        reason: DiscardReason::ProtocolError,
        detail: detail.into(),
    }
}

/// One peer's reconciliation engine for any number of concurrent blocks.
pub struct Reconciler {
    role: Role,
    config: Config,
    rng: Box<dyn RandomSource>,
    blocks: HashMap<u64, Block>,
    pending_starts: HashMap<u64, Vec<u8>>,
    finished: HashSet<u64>,
    qber_estimate: Option<f64>,
}

impl Reconciler {
    /// Creates a peer; `rng` supplies every seed this peer chooses (use
    /// [`crate::rng::OsRandom`] in production).
    pub fn new(
        role: Role,
        config: Config,
        rng: Box<dyn RandomSource>,
    ) -> Result<Self, ReconcileError> {
        config.validate()?;
        Ok(Reconciler {
            role,
            qber_estimate: config.initial_qber,
            config,
            rng,
            blocks: HashMap::new(),
            pending_starts: HashMap::new(),
            finished: HashSet::new(),
        })
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// QBER used to size the next block's Cascade passes (last verified block's QBER).
    pub fn qber_estimate(&self) -> Option<f64> {
        self.qber_estimate
    }

    /// Ids of blocks in progress.
    pub fn active_blocks(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.blocks.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Starts a block from this peer's raw key. The initiator returns its START message;
    /// the responder returns nothing unless the peer's START already arrived.
    pub fn start_block(&mut self, block_id: u64, raw: BitVec) -> Result<Step, ReconcileError> {
        if self.blocks.contains_key(&block_id) || self.finished.contains(&block_id) {
            return Err(ReconcileError::DuplicateBlock(block_id));
        }
        if raw.is_empty() || raw.len() > MAX_BLOCK_BITS {
            return Err(ReconcileError::BlockSize {
                bits: raw.len(),
                max: MAX_BLOCK_BITS,
            });
        }
        let stats = BlockStats {
            raw_bits: raw.len() as u64,
            ..BlockStats::default()
        };
        match self.role {
            Role::Initiator => {
                let (block, start) = self.open_initiator_block(raw, stats)?;
                let mut block = block;
                let messages = vec![self.seal(block_id, &mut block, Body::Start(start))];
                self.blocks.insert(block_id, block);
                Ok(Step {
                    messages,
                    outcome: None,
                })
            }
            Role::Responder => {
                let block = Block {
                    phase: Phase::AwaitStart { raw },
                    stats,
                    send_seq: 0,
                    recv_seq: 0,
                };
                self.blocks.insert(block_id, block);
                match self.pending_starts.remove(&block_id) {
                    Some(bytes) => self.handle_message(&bytes),
                    None => Ok(Step::default()),
                }
            }
        }
    }

    fn open_initiator_block(
        &mut self,
        raw: BitVec,
        mut stats: BlockStats,
    ) -> Result<(Block, Start), ReconcileError> {
        let n = raw.len();
        let sample_count = if self.qber_estimate.is_some() {
            0
        } else {
            self.config.sample_bits.min(n / 10)
        };
        let shuffle_seed = self.rng.next_u64()?;
        let sample_seed = self.rng.next_u64()?;
        let positions = sample_positions(sample_seed, n, sample_count);
        let sample = BitVec::from_bits(
            &positions
                .iter()
                .map(|&p| u8::from(raw.get(p)))
                .collect::<Vec<_>>(),
        );
        let key = raw.without_positions(&positions);
        stats.sample_bits = sample_count as u64;
        stats.key_bits = key.len() as u64;
        let start = Start {
            raw_bits: n as u64,
            qber_estimate: self.qber_estimate.unwrap_or(f64::NAN),
            shuffle_seed,
            sample_seed,
            params: self.config.shared(),
            sample,
        };
        let block = Block {
            phase: Phase::Answering {
                oracle: ParityOracle::new(key, shuffle_seed),
            },
            stats,
            send_seq: 0,
            recv_seq: 0,
        };
        Ok((block, start))
    }

    /// Ends a block on this side (e.g. after a timeout) and returns the ABORT for the peer.
    pub fn abort_block(&mut self, block_id: u64, detail: &str) -> Result<Step, ReconcileError> {
        let mut block = self
            .blocks
            .remove(&block_id)
            .ok_or(ReconcileError::UnknownBlock(block_id))?;
        let err = BlockError {
            reason: DiscardReason::Aborted,
            detail: detail.to_string(),
        };
        Ok(self.fail_block(block_id, &mut block, err, true))
    }

    /// Handles one message from the peer.
    ///
    /// Returns `Err` only for messages that belong to no block in progress (unknown or
    /// finished block id, unreadable header); such messages change nothing. Problems with
    /// a message of a block in progress end that block and are reported in the outcome.
    pub fn handle_message(&mut self, data: &[u8]) -> Result<Step, ReconcileError> {
        let message = match Message::decode(data) {
            Ok(m) => m,
            Err(e) => {
                if let Some(id) = peek_block_id(data) {
                    if let Some(mut block) = self.blocks.remove(&id) {
                        block.stats.messages_received += 1;
                        return Ok(self.fail_block(
                            id,
                            &mut block,
                            protocol_error(e.to_string()),
                            true,
                        ));
                    }
                }
                return Err(ReconcileError::Message(e));
            }
        };
        let id = message.block_id;
        let Some(mut block) = self.blocks.remove(&id) else {
            if self.role == Role::Responder
                && matches!(message.body, Body::Start(_))
                && message.seq == 0
                && !self.finished.contains(&id)
            {
                if self.pending_starts.len() >= MAX_PENDING_STARTS
                    && !self.pending_starts.contains_key(&id)
                {
                    return Err(ReconcileError::TooManyPending(MAX_PENDING_STARTS));
                }
                self.pending_starts.insert(id, data.to_vec());
                return Ok(Step::default());
            }
            return Err(if self.finished.contains(&id) {
                ReconcileError::FinishedBlock(id)
            } else {
                ReconcileError::UnknownBlock(id)
            });
        };
        block.stats.messages_received += 1;
        // An abort is honoured whatever its sequence number: it may overtake or follow a
        // lost message, and ending a block is always safe.
        if let Body::Abort(a) = &message.body {
            let err = BlockError {
                reason: a.reason,
                detail: a.detail.clone(),
            };
            return Ok(self.fail_block(id, &mut block, err, false));
        }
        if message.seq != block.recv_seq {
            let err = protocol_error(format!(
                "message {:?} has sequence number {}, expected {}: replayed, reordered or lost message",
                message.body.kind(),
                message.seq,
                block.recv_seq
            ));
            return Ok(self.fail_block(id, &mut block, err, true));
        }
        block.recv_seq += 1;
        match self.advance(&mut block, message.body) {
            Ok(Flow::Continue(bodies)) => {
                let messages = bodies
                    .into_iter()
                    .map(|b| self.seal(id, &mut block, b))
                    .collect();
                self.blocks.insert(id, block);
                Ok(Step {
                    messages,
                    outcome: None,
                })
            }
            Ok(Flow::Finish(bodies, result)) => {
                let messages = bodies
                    .into_iter()
                    .map(|b| self.seal(id, &mut block, b))
                    .collect();
                let outcome = self.finish(id, block, result);
                Ok(Step {
                    messages,
                    outcome: Some(outcome),
                })
            }
            Err(err) => Ok(self.fail_block(id, &mut block, err, true)),
        }
    }

    fn seal(&self, block_id: u64, block: &mut Block, body: Body) -> Vec<u8> {
        let m = Message {
            block_id,
            seq: block.send_seq,
            body,
        };
        block.send_seq += 1;
        block.stats.messages_sent += 1;
        m.encode()
    }

    fn fail_block(
        &mut self,
        block_id: u64,
        block: &mut Block,
        err: BlockError,
        notify_peer: bool,
    ) -> Step {
        let mut messages = Vec::new();
        if notify_peer {
            let body = Body::Abort(Abort {
                reason: err.reason,
                detail: err.detail.clone(),
            });
            messages.push(self.seal(block_id, block, body));
        }
        let result = BlockResult::Discarded {
            reason: err.reason,
            detail: err.detail,
            by_peer: !notify_peer,
        };
        let stats = std::mem::take(&mut block.stats);
        let outcome = self.finish(
            block_id,
            Block {
                phase: Phase::AwaitStart {
                    raw: BitVec::zeros(0),
                },
                stats,
                send_seq: 0,
                recv_seq: 0,
            },
            result,
        );
        Step {
            messages,
            outcome: Some(outcome),
        }
    }

    fn finish(&mut self, block_id: u64, block: Block, result: BlockResult) -> BlockOutcome {
        self.finished.insert(block_id);
        let stats = block.stats;
        match &result {
            BlockResult::Verified { key } => {
                self.qber_estimate = Some(stats.qber().max(1e-4));
                log::info!(
                    "block {block_id:#x}: verified; {} raw bits, {} reconciled, QBER {:.4}, {} parity bits and {} tag bits disclosed, final key {} bits",
                    stats.raw_bits,
                    stats.key_bits,
                    stats.qber(),
                    stats.leak_ec,
                    stats.tag_bits,
                    key.len()
                );
            }
            BlockResult::Discarded {
                reason,
                detail,
                by_peer,
            } => {
                if *reason == DiscardReason::QberAboveLimit && stats.errors > 0 {
                    self.qber_estimate = Some(stats.qber());
                }
                let side = if *by_peer { "by the peer" } else { "here" };
                log::warn!(
                    "block {block_id:#x}: discarded {side} ({}): {detail}",
                    reason.as_str()
                );
            }
        }
        BlockOutcome {
            block_id,
            result,
            stats,
        }
    }

    fn advance(&mut self, block: &mut Block, body: Body) -> Result<Flow, BlockError> {
        let phase = std::mem::replace(
            &mut block.phase,
            Phase::AwaitStart {
                raw: BitVec::zeros(0),
            },
        );
        match (phase, body) {
            (Phase::AwaitStart { raw }, Body::Start(start)) => self.on_start(block, raw, start),
            (Phase::Answering { mut oracle }, Body::ParityRequest(req)) => {
                let answer = oracle
                    .answer(&req)
                    .map_err(|e| protocol_error(format!("invalid parity request: {e}")))?;
                block.stats.leak_ec = oracle.disclosed();
                block.phase = Phase::Answering { oracle };
                Ok(Flow::Continue(vec![Body::ParityAnswer(answer)]))
            }
            (Phase::Answering { oracle }, Body::Verify(v)) => self.on_verify(block, oracle, v),
            (Phase::Correcting { mut corrector }, Body::ParityAnswer(answer)) => {
                let step = corrector
                    .handle_answer(&answer)
                    .map_err(|e| protocol_error(format!("invalid parity answer: {e}")))?;
                block.stats.leak_ec = corrector.disclosed();
                block.stats.errors = corrector.corrected();
                match step {
                    CorrectorStep::Request(req) => {
                        block.phase = Phase::Correcting { corrector };
                        Ok(Flow::Continue(vec![Body::ParityRequest(req)]))
                    }
                    CorrectorStep::Done => self.on_corrected(block, corrector),
                }
            }
            (
                Phase::AwaitConfirm {
                    key,
                    tag,
                    final_bits,
                },
                Body::Confirm(c),
            ) => on_confirm(block, key, tag, final_bits, c),
            (phase, body) => Err(protocol_error(format!(
                "unexpected {:?} message while {}",
                body.kind(),
                match phase {
                    Phase::AwaitStart { .. } => "waiting for START",
                    Phase::Answering { .. } => "answering parity requests",
                    Phase::Correcting { .. } => "waiting for a parity answer",
                    Phase::AwaitConfirm { .. } => "waiting for CONFIRM",
                }
            ))),
        }
    }

    fn on_start(
        &mut self,
        block: &mut Block,
        raw: BitVec,
        start: Start,
    ) -> Result<Flow, BlockError> {
        let own = self.config.shared();
        if start.params != own {
            return Err(BlockError {
                reason: DiscardReason::ConfigMismatch,
                detail: format!(
                    "peer uses eps_sec={}, eps_cor={}, qber_limit={}; this node uses eps_sec={}, eps_cor={}, qber_limit={}; configure both nodes alike",
                    start.params.eps_sec, start.params.eps_cor, start.params.qber_limit,
                    own.eps_sec, own.eps_cor, own.qber_limit
                ),
            });
        }
        if start.raw_bits != raw.len() as u64 {
            return Err(BlockError {
                reason: DiscardReason::LengthMismatch,
                detail: format!(
                    "peer's block has {} raw bits, this node's has {}; both must assemble the block from the same epochs",
                    start.raw_bits,
                    raw.len()
                ),
            });
        }
        let n = raw.len();
        let s = start.sample.len();
        if s > n / 10 {
            return Err(protocol_error(format!(
                "sample of {s} bits exceeds a tenth of the {n}-bit block"
            )));
        }
        let positions = sample_positions(start.sample_seed, n, s);
        let sample_errors = positions
            .iter()
            .enumerate()
            .filter(|&(i, &p)| raw.get(p) != start.sample.get(i))
            .count();
        block.stats.sample_bits = s as u64;
        block.stats.sample_errors = sample_errors as u64;
        let estimate = if s > 0 {
            let q = sample_errors as f64 / s as f64;
            // Discard early only when even the lower 3-sigma bound is above the limit.
            let sigma = (q * (1.0 - q) / s as f64).sqrt();
            if q - 3.0 * sigma > self.config.qber_limit {
                return Err(BlockError {
                    reason: DiscardReason::QberAboveLimit,
                    detail: format!(
                        "sample QBER {q:.4} ({sample_errors} errors in {s} bits) is above the limit {}",
                        self.config.qber_limit
                    ),
                });
            }
            sample_qber_upper_bound(sample_errors, s)
        } else if start.qber_estimate.is_finite() && start.qber_estimate > 0.0 {
            start.qber_estimate
        } else {
            return Err(protocol_error(
                "START carries neither a sample nor a QBER estimate",
            ));
        };
        let key = raw.without_positions(&positions);
        block.stats.key_bits = key.len() as u64;
        let sizes = block_sizes(key.len(), estimate.min(0.25), self.config.passes);
        let mut corrector = Corrector::new(key, start.shuffle_seed, sizes, self.config.passes);
        match corrector.start() {
            CorrectorStep::Request(req) => {
                block.phase = Phase::Correcting { corrector };
                Ok(Flow::Continue(vec![Body::ParityRequest(req)]))
            }
            CorrectorStep::Done => self.on_corrected(block, corrector),
        }
    }

    /// Responder: Cascade finished; check the QBER and the key length, then send VERIFY.
    fn on_corrected(
        &mut self,
        block: &mut Block,
        corrector: Corrector,
    ) -> Result<Flow, BlockError> {
        let stats = &mut block.stats;
        stats.errors = corrector.corrected();
        stats.leak_ec = corrector.disclosed();
        stats.tag_bits = TAG_BITS;
        let q = stats.qber();
        if q > self.config.qber_limit {
            return Err(BlockError {
                reason: DiscardReason::QberAboveLimit,
                detail: format!(
                    "QBER {q:.4} ({} errors in {} bits) is above the limit {}",
                    stats.errors, stats.key_bits, self.config.qber_limit
                ),
            });
        }
        let final_bits = final_key_length(
            stats.key_bits,
            stats.errors,
            stats.leak_ec,
            TAG_BITS,
            &self.config.security,
        );
        if final_bits == 0 {
            return Err(BlockError {
                reason: DiscardReason::NoSecretKey,
                detail: format!(
                    "no secret key: {} bits at QBER {q:.4} with {} parity bits disclosed leave nothing after the finite-key bound",
                    stats.key_bits, stats.leak_ec
                ),
            });
        }
        let key = corrector.into_key();
        let bound = collision_bound(key.len());
        if bound > self.config.security.eps_cor {
            return Err(BlockError {
                reason: DiscardReason::ConfigMismatch,
                detail: format!(
                    "verification tag collision bound {bound:e} exceeds eps_cor {}",
                    self.config.security.eps_cor
                ),
            });
        }
        let hash_keys = self
            .random_hash_keys()
            .map_err(|e| protocol_error(e.to_string()))?;
        let own_tag = tag(&key, hash_keys);
        let verify = Verify {
            errors: stats.errors,
            leak_ec: stats.leak_ec,
            final_bits,
            hash_keys: hash_keys.0,
            tag: own_tag,
        };
        block.phase = Phase::AwaitConfirm {
            key,
            tag: own_tag,
            final_bits,
        };
        Ok(Flow::Continue(vec![Body::Verify(verify)]))
    }

    fn random_hash_keys(&mut self) -> Result<HashKeys, ReconcileError> {
        Ok(HashKeys::from_random(
            self.rng.next_u64()?,
            self.rng.next_u64()?,
        ))
    }

    /// Initiator: compare the responder's tag with its own, then release the key.
    fn on_verify(
        &mut self,
        block: &mut Block,
        oracle: ParityOracle,
        v: Verify,
    ) -> Result<Flow, BlockError> {
        let stats = &mut block.stats;
        stats.errors = v.errors;
        stats.leak_ec = oracle.disclosed();
        stats.tag_bits = TAG_BITS;
        if v.leak_ec != stats.leak_ec {
            return Err(protocol_error(format!(
                "peer counted {} disclosed parity bits, this node {}",
                v.leak_ec, stats.leak_ec
            )));
        }
        if v.errors > stats.key_bits || stats.qber() > self.config.qber_limit {
            return Err(protocol_error(format!(
                "peer reports {} errors in {} bits, above the QBER limit {}",
                v.errors, stats.key_bits, self.config.qber_limit
            )));
        }
        let final_bits = final_key_length(
            stats.key_bits,
            v.errors,
            stats.leak_ec,
            TAG_BITS,
            &self.config.security,
        );
        if v.final_bits != final_bits || final_bits == 0 {
            return Err(protocol_error(format!(
                "peer computed a final key of {} bits, this node {final_bits}",
                v.final_bits
            )));
        }
        let keys = HashKeys(v.hash_keys);
        if !keys.is_valid() {
            return Err(protocol_error("verification hash keys out of range"));
        }
        let key = oracle.key();
        let own_tag = tag(key, keys);
        if own_tag != v.tag {
            return Err(BlockError {
                reason: DiscardReason::VerificationFailed,
                detail: format!(
                    "verification tags differ after correcting {} errors: the keys are not equal",
                    v.errors
                ),
            });
        }
        let n = key.len();
        let mut seed_bytes = vec![0u8; (n + final_bits as usize - 1).div_ceil(8)];
        self.rng
            .fill(&mut seed_bytes)
            .map_err(|e| protocol_error(e.to_string()))?;
        let pa_seed =
            BitVec::from_msb_bytes(&seed_bytes, n + final_bits as usize - 1).expect("length");
        let final_key = toeplitz_hash(key, &pa_seed, final_bits as usize);
        stats.final_bits = final_bits;
        let confirm = Confirm {
            tag: own_tag,
            final_bits,
            pa_seed,
        };
        Ok(Flow::Finish(
            vec![Body::Confirm(confirm)],
            BlockResult::Verified { key: final_key },
        ))
    }
}

/// Responder: check the initiator's tag and compute the final key.
fn on_confirm(
    block: &mut Block,
    key: BitVec,
    own_tag: [u64; 2],
    final_bits: u64,
    c: Confirm,
) -> Result<Flow, BlockError> {
    if c.tag != own_tag {
        return Err(BlockError {
            reason: DiscardReason::VerificationFailed,
            detail: "the peer's verification tag differs from this node's".into(),
        });
    }
    if c.final_bits != final_bits {
        return Err(protocol_error(format!(
            "peer confirms a final key of {} bits, this node computed {final_bits}",
            c.final_bits
        )));
    }
    let expected_seed = key.len() + final_bits as usize - 1;
    if c.pa_seed.len() != expected_seed {
        return Err(protocol_error(format!(
            "privacy-amplification seed has {} bits, expected {expected_seed}",
            c.pa_seed.len()
        )));
    }
    block.stats.final_bits = final_bits;
    let final_key = toeplitz_hash(&key, &c.pa_seed, final_bits as usize);
    Ok(Flow::Finish(
        Vec::new(),
        BlockResult::Verified { key: final_key },
    ))
}

/// Result of [`run_pair`]: both peers' outcomes and the number of messages exchanged.
#[derive(Debug)]
pub struct PairRun {
    pub initiator: BlockOutcome,
    pub responder: BlockOutcome,
    pub messages: usize,
}

/// Runs one block between two in-process peers, passing every message straight across.
/// For tests and benchmarks; `tamper` may rewrite or drop (return `None`) any message
/// (arguments: message index, sent by the initiator).
pub fn run_pair(
    initiator: &mut Reconciler,
    responder: &mut Reconciler,
    block_id: u64,
    raw_initiator: BitVec,
    raw_responder: BitVec,
    mut tamper: impl FnMut(usize, bool, Vec<u8>) -> Option<Vec<u8>>,
) -> Result<PairRun, ReconcileError> {
    let mut out_i = None;
    let mut out_r = responder.start_block(block_id, raw_responder)?.outcome;
    let mut queue: std::collections::VecDeque<(bool, Vec<u8>)> = initiator
        .start_block(block_id, raw_initiator)?
        .messages
        .into_iter()
        .map(|m| (true, m))
        .collect();
    let mut count = 0;
    while let Some((from_initiator, bytes)) = queue.pop_front() {
        let index = count;
        count += 1;
        let Some(bytes) = tamper(index, from_initiator, bytes) else {
            continue;
        };
        let target = if from_initiator {
            &mut *responder
        } else {
            &mut *initiator
        };
        let step = match target.handle_message(&bytes) {
            Ok(step) => step,
            // A message for a block the receiver already ended changes nothing.
            Err(ReconcileError::FinishedBlock(_)) | Err(ReconcileError::UnknownBlock(_)) => {
                continue
            }
            Err(e) => return Err(e),
        };
        for m in step.messages {
            queue.push_back((!from_initiator, m));
        }
        if let Some(o) = step.outcome {
            if from_initiator {
                out_r = Some(o);
            } else {
                out_i = Some(o);
            }
        }
    }
    // A dropped message leaves a block open; end it the way a caller's timeout would.
    if out_i.is_none() {
        out_i = initiator
            .abort_block(block_id, "no reply from the peer")?
            .outcome;
    }
    if out_r.is_none() {
        out_r = responder
            .abort_block(block_id, "no reply from the peer")?
            .outcome;
    }
    Ok(PairRun {
        initiator: out_i.expect("initiator outcome"),
        responder: out_r.expect("responder outcome"),
        messages: count,
    })
}

/// Upper end of the two-sigma Wilson score interval of a QBER sample with `errors` errors
/// in `bits` bits. It sizes the Cascade passes of the first block.
///
/// A sample of about a thousand bits holds only a few errors at QBER below 1 %. Its error
/// fraction is then often far too low (0 errors at QBER 0.2 % is common). Blocks sized for
/// it hold several errors each, and four passes leave some behind: a quarter of the blocks
/// failed verification at QBER 0.1 %. The upper bound costs a few more parities, on the
/// first block only, because later blocks use the exact QBER of the block before.
fn sample_qber_upper_bound(errors: usize, bits: usize) -> f64 {
    const Z: f64 = 2.0;
    let (e, s) = (errors as f64, bits as f64);
    let z2 = Z * Z;
    (e + z2 / 2.0 + Z * (e * (s - e) / s + z2 / 4.0).sqrt()) / (s + z2)
}
