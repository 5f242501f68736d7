// Type declarations of @datasource-collab/client (hand-written; checked by
// `npm run typecheck` against types/example.ts).
import type * as Y from 'yjs'
import type { WebsocketProvider } from 'y-websocket'

/** A value that changes over time: `get()` now, `subscribe(fn)` calls fn at once and on every change. */
export interface Observable<T> {
  get(): T
  subscribe(fn: (value: T) => void): () => void
}

export type ConnectionStatus = 'connecting' | 'connected' | 'disconnected' | 'closed'

export interface User {
  id: string
  name: string | null
  role: string | null
  color?: string
}

/** One user in the workspace, over all of their connections (docs/presence.md). */
export interface Participant {
  user_id: string
  name: string
  color: string
  role: string
  connections: number
  joined_at: number
  last_active: number
  node: string
  nodes: string[]
  /** The config path this user is editing (their awareness `focus`), or null. */
  editing: string | null
  /** Config paths this user holds locks on. */
  locks: string[]
}

/** A lease on a config path (docs/locks.md). */
export interface LockRecord {
  path: string
  /** The connection holding it. */
  holder: string
  user_id: string
  name: string
  fence: number
  /** Unix seconds on the server's clock; "at least until". */
  expires_at: number
}

export interface LockInfo extends LockRecord {
  /** Held by this connection. */
  mine: boolean
}

export interface LockGrant extends LockRecord {
  type: 'lock.granted'
  id: number
  ttl: number
  /** The lease's secret (X-Lock-Token for HTTP edits). */
  token?: string
}

export interface LockReleaseOk {
  type: 'lock.release.ok'
  id: number
  path: string
  fence?: number
  cancelled?: boolean
  forced?: boolean
}

export interface AcquireOptions {
  /** Seconds to queue when the path is taken (default 0: answer at once). */
  wait?: number
  /** Lease TTL in seconds (the server clamps it). */
  ttl?: number
  /** Milliseconds before the promise rejects with code `timeout`. */
  timeout?: number
}

export interface ControlMessage {
  type: string
  id?: unknown
  [key: string]: unknown
}

export interface SavedMessage extends ControlMessage { type: 'saved'; updates: number; seq: number }
export interface ForwardedMessage extends ControlMessage { type: 'forwarded'; seq: number; first_seq: number; pending: number; changes: number }
export interface ValidationError { path: string; loc: (string | number)[]; type: string; msg: string; input?: unknown; ctx?: Record<string, unknown> }
export interface RejectedMessage extends ControlMessage {
  type: 'rejected'
  paths: string[]
  /** `locked`, `invalid`, `read-only`, `document_too_large`, ... */
  reason: string
  errors?: ValidationError[]
  path?: string
  user_id?: string
  name?: string
}
export interface ForwardFailedMessage extends ControlMessage {
  type: 'forward.failed'; seq: number; first_seq: number; status: number; paths: string[]; error: unknown; retrying: boolean
}
export interface WelcomeMessage extends ControlMessage {
  type: 'welcome'; server: string; version: string; protocol: number; workspace: string; saved_seq: number; limits: Record<string, number>
}

export interface ConfigChange {
  /** Dotted path inside `config`, e.g. `connection.host`. */
  path: string
  action: 'add' | 'update' | 'delete'
  oldValue: unknown
  newValue: unknown
}

export interface WorkspaceEvents {
  status: { status: ConnectionStatus }
  synced: boolean
  welcome: WelcomeMessage
  saved: SavedMessage
  forwarded: ForwardedMessage
  rejected: RejectedMessage
  'forward.failed': ForwardFailedMessage
  'forward.reverted': ControlMessage
  'forward.dead': ControlMessage
  'backend.changed': ControlMessage
  'lock.overridden': ControlMessage
  'auth.expiring': ControlMessage
  'auth.ok': ControlMessage
  'token-refreshed': ControlMessage | null
  presence: { joined: Participant[]; left: Participant[]; message: ControlMessage }
  locks: { acquired: LockInfo[]; released: LockInfo[]; reason: string }
  change: { changes: ConfigChange[]; local: boolean; origin: 'local' | 'remote' }
  control: ControlMessage
  'connection-close': { code: number | null; reason: string }
  closed: { code: number; reason: string }
  error: Error
}

export interface ConnectOptions {
  /** The server's websocket base, e.g. `ws://host:8765/ws`. */
  url: string
  /** The workspace (room) id, e.g. the data source id. */
  workspace: string
  /** A fixed token (jwt mode); sent as the `token` query parameter. */
  token?: string
  /** Called for the first token, on `auth.expiring` and after a 4401 close. */
  getToken?: () => string | Promise<string>
  /** Your own Y.Doc (default: a new one). */
  doc?: Y.Doc
  /** The WebSocket class; in Node 20 pass the `ws` package's default export. */
  WebSocketPolyfill?: unknown
  /** Extra query parameters (development identity: `user`, `name`, `role`). */
  params?: Record<string, string>
  /** Keep y-websocket's BroadcastChannel between tabs off (default true): every edit goes through the server's guards. */
  disableBc?: boolean
  /** Connect at once (default true). */
  connect?: boolean
  maxBackoffTime?: number
  /** Milliseconds before a control request rejects with `timeout` (default 15000). */
  requestTimeout?: number
}

export interface EventBus {
  emit(name: string, payload: unknown): unknown
}

export interface BridgeOptions {
  /** Put in every payload; default the workspace id. */
  dataSourceId?: string
  /** Emit participant events for this user too (default false). */
  includeSelf?: boolean
}

export interface Workspace {
  readonly workspace: string
  readonly doc: Y.Doc
  readonly provider: WebsocketProvider
  /** The data-source configuration. */
  readonly config: Y.Map<unknown>
  readonly awareness: WebsocketProvider['awareness']
  readonly status: Observable<ConnectionStatus>
  readonly synced: Observable<boolean>
  readonly participants: Observable<Participant[]>
  readonly locks: Observable<LockInfo[]>
  readonly user: Observable<User | null>
  /** This connection's holder id, once known. */
  readonly holderId: string | null
  readonly savedSeq: number | null
  readonly welcome: WelcomeMessage | null
  on<K extends keyof WorkspaceEvents>(name: K, fn: (payload: WorkspaceEvents[K]) => void): () => void
  on(name: string, fn: (payload: ControlMessage) => void): () => void
  once<K extends keyof WorkspaceEvents>(name: K, fn: (payload: WorkspaceEvents[K]) => void): () => void
  off(name: string, fn: (payload: never) => void): void
  /** Send a control request; resolves with its answer, rejects with CollabError. */
  request(message: ControlMessage, options?: { timeout?: number }): Promise<ControlMessage>
  /** Resolves on `lock.granted`; rejects with CollabError code `conflict` or the `lock.error` code. */
  acquireLock(path: string, options?: AcquireOptions): Promise<LockGrant>
  releaseLock(path: string, options?: { timeout?: number }): Promise<LockReleaseOk>
  /** Resolves once every change made so far is stored durably by the server. */
  whenSaved(options?: { timeout?: number }): Promise<{ updates: number; seq: number | null }>
  whenSynced(options?: { timeout?: number }): Promise<void>
  refreshToken(): Promise<ControlMessage | null>
  /** The value at a dotted path of `config`, as plain JSON. */
  get(path: string): unknown
  /** Set (or with `undefined`, delete) the value at a dotted path of `config`. */
  edit(path: string, value: unknown): void
  /** Tell the others which path you are editing (awareness `focus`). */
  setFocus(path: string | null): void
  bridgeToEventBus(bus: EventBus, options?: BridgeOptions): () => void
  destroy(): void
}

export declare class CollabError extends Error {
  readonly code: string
  readonly details: Record<string, unknown>
  constructor(code: string, message?: string, details?: Record<string, unknown>)
}

export declare const EVENT_NAMES: Readonly<{
  participantJoined: 'collaboration:participant:joined'
  participantLeft: 'collaboration:participant:left'
  locked: 'collaboration:data_source:locked'
  unlocked: 'collaboration:data_source:unlocked'
  updated: 'collaboration:data_source:updated'
  broadcast: 'collaboration:operation:broadcast'
}>

export declare function connectWorkspace(options: ConnectOptions): Workspace
export declare function bridgeToEventBus(workspace: Workspace, bus: EventBus, options?: BridgeOptions): () => void

export declare const MESSAGE_CONTROL: 100
export declare const PROTOCOL_VERSION: 1
export declare function encodeControl(message: ControlMessage): Uint8Array
export declare function decodeControlPayload(bytes: Uint8Array): ControlMessage
export declare function applyPresence(roster: Map<string, Participant>, message: ControlMessage): Map<string, Participant>
export declare function participantList(roster: Map<string, Participant>): Participant[]
export declare function applyLockMessage(locks: Map<string, LockRecord>, message: ControlMessage): Map<string, LockRecord>
export declare function covers(a: string, b: string): boolean
export declare function createObservable<T>(initial: T, equals?: (a: T, b: T) => boolean): Observable<T> & { set(value: T): void }
