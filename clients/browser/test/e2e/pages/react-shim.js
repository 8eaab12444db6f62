// Lets `import * as React from "react"` (and named imports) resolve to the UMD build loaded on
// the page.
const React = window.React;
export default React;
export const {
  Component,
  Fragment,
  StrictMode,
  createContext,
  createElement,
  useCallback,
  useContext,
  useEffect,
  useMemo,
  useReducer,
  useRef,
  useState,
  useSyncExternalStore,
} = React;
