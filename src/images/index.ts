export { buildImage, baseKernelArgs, contentId } from './build.ts';
export { collectImages, formatGc, holders, planGc, type GcPlan } from './gc.ts';
export { importImage, type ImportRequest } from './import.ts';
export { imageShell, maintainImage, recipeOf } from './maintain.ts';
export { findRecipe, listRecipes, loadRecipeFile, parseRecipe, type Recipe } from './recipe.ts';
export { ImageStore, type Image, type ImageManifest } from './store.ts';
