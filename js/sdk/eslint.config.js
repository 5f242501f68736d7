// ESLint flat config: the recommended rules for the package, its tests and scripts.
import js from '@eslint/js'

const shared = {
  console: 'readonly', setTimeout: 'readonly', clearTimeout: 'readonly', setInterval: 'readonly',
  clearInterval: 'readonly', queueMicrotask: 'readonly', globalThis: 'readonly', URL: 'readonly',
  TextEncoder: 'readonly', TextDecoder: 'readonly'
}
const node = { process: 'readonly', Buffer: 'readonly' }
const browser = { window: 'readonly', document: 'readonly', WebSocket: 'readonly' }

export default [
  { ignores: ['node_modules/', 'scratch/', 'types/', '.readme-test/'] },
  js.configs.recommended,
  {
    files: ['**/*.js', '**/*.mjs'],
    languageOptions: { ecmaVersion: 2022, sourceType: 'module', globals: { ...shared, ...node, ...browser } },
    rules: {
      'no-unused-vars': ['error', { argsIgnorePattern: '^_' }],
      eqeqeq: ['error', 'always', { null: 'ignore' }],
      'no-var': 'error',
      'prefer-const': 'error'
    }
  }
]
