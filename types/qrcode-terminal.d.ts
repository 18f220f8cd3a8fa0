// qrcode-terminal ships no types; this is the one function nanoclaw.ts calls.
declare module 'qrcode-terminal' {
  export function generate(text: string, options: { small?: boolean }, callback: (qr: string) => void): void;
}
