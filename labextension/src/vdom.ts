/**
 * A tiny virtual DOM with in-place patching.
 *
 * The kernel pushes a new snapshot up to twice a second; rebuilding the panel each time
 * would replace buttons under the user's pointer and eat clicks. Patching keeps every
 * element whose tag and key are unchanged, and only touches changed text and attributes.
 */

export interface IVNode {
  tag: string;
  key?: string;
  attrs: { [name: string]: string };
  children: VChild[];
}

export type VChild = IVNode | string;

export function h(
  tag: string,
  attrs: { [name: string]: string | number | boolean | null | undefined } | null,
  ...children: (VChild | VChild[] | null | undefined | false)[]
): IVNode {
  const clean: { [name: string]: string } = {};
  let key: string | undefined;
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) {
      continue;
    }
    if (name === 'key') {
      key = String(value);
      continue;
    }
    clean[name] = value === true ? '' : String(value);
  }
  const flat: VChild[] = [];
  for (const child of children) {
    if (child === null || child === undefined || child === false) {
      continue;
    }
    if (Array.isArray(child)) {
      flat.push(...child);
    } else {
      flat.push(child);
    }
  }
  return { tag, key, attrs: clean, children: flat };
}

function create(node: VChild): Node {
  if (typeof node === 'string') {
    return document.createTextNode(node);
  }
  const el = document.createElement(node.tag);
  if (node.key !== undefined) {
    el.dataset.vkey = node.key;
  }
  for (const [name, value] of Object.entries(node.attrs)) {
    el.setAttribute(name, value);
  }
  for (const child of node.children) {
    el.appendChild(create(child));
  }
  return el;
}

function sameKind(dom: Node, node: VChild): boolean {
  if (typeof node === 'string') {
    return dom.nodeType === Node.TEXT_NODE;
  }
  if (!(dom instanceof HTMLElement)) {
    return false;
  }
  return (
    dom.tagName.toLowerCase() === node.tag &&
    (dom.dataset.vkey ?? undefined) === node.key
  );
}

function patchNode(dom: Node, node: VChild): Node {
  if (!sameKind(dom, node)) {
    const fresh = create(node);
    dom.parentNode?.replaceChild(fresh, dom);
    return fresh;
  }
  if (typeof node === 'string') {
    if (dom.textContent !== node) {
      dom.textContent = node;
    }
    return dom;
  }
  const el = dom as HTMLElement;
  for (const attr of Array.from(el.attributes)) {
    if (attr.name !== 'data-vkey' && !(attr.name in node.attrs)) {
      el.removeAttribute(attr.name);
    }
  }
  for (const [name, value] of Object.entries(node.attrs)) {
    if (el.getAttribute(name) !== value) {
      el.setAttribute(name, value);
    }
  }
  // An element marked data-static keeps what was put in it outside the tree (an icon).
  if (!('data-static' in node.attrs)) {
    patchChildren(el, node.children);
  }
  return el;
}

/** Make `parent`'s children match `nodes`, reusing keyed elements where possible. */
export function patchChildren(parent: HTMLElement, nodes: VChild[]): void {
  const keyed = new Map<string, HTMLElement>();
  for (const child of Array.from(parent.childNodes)) {
    if (child instanceof HTMLElement && child.dataset.vkey !== undefined) {
      keyed.set(`${child.tagName.toLowerCase()}#${child.dataset.vkey}`, child);
    }
  }
  nodes.forEach((node, index) => {
    let current: Node | undefined = parent.childNodes[index];
    if (typeof node !== 'string' && node.key !== undefined) {
      const match = keyed.get(`${node.tag}#${node.key}`);
      if (match && match !== current) {
        parent.insertBefore(match, current ?? null);
        current = match;
      }
    }
    if (current === undefined) {
      parent.appendChild(create(node));
    } else {
      patchNode(current, node);
    }
  });
  while (parent.childNodes.length > nodes.length) {
    parent.removeChild(parent.lastChild as Node);
  }
}
