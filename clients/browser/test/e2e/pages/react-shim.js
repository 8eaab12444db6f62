// Lets `import { useState } from "react"` resolve to the UMD build loaded on the page.
const React = window.React;
export default React;
export const { useEffect, useRef, useState, createElement, createContext, useContext } = React;
